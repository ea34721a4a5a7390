"""A network lab: hosts in network namespaces on one bridge, every link shaped both ways.

Why: P2P distribution is about *links* — a registry uplink that saturates, peers that each
bring their own bandwidth. On one machine that only shows when each host has its own network
stack and a shaped link. This is RECIPES §6 (``recipes/netns-lab.sh``) as a reusable module,
for ``fanout_bench.py``, ``tests/dfagent/e2e/test_netns.py`` and ``scripts/demo.sh``:

- a bridge namespace ``{prefix}br`` holding ``br0``; the root namespace is never touched;
- one namespace per host, ``{prefix}{name}`` (e.g. ``dff-reg``, ``dff-h1``), joined to the
  bridge by a veth pair: ``eth0`` in the host, ``p{i}`` on the bridge; addresses
  ``{subnet}.{i + 1}/24`` in the order the hosts are given (the default subnet,
  10.215.1.0/24, is private to this lab: other labs use ``dfb-``/10.214.x and ``p2p-``/10.213.x);
- each link shaped with ``tc tbf`` on the host's ``eth0`` (what it sends) *and* on the bridge
  port towards it (what it receives), so a host with rate R can neither send nor receive faster
  than R (the kernel has tbf but no netem: no delay or loss);
- processes run in a host's namespace with ``nsenter --net=/run/netns/NAME``, which enters the
  network namespace only — unlike ``ip netns exec`` it keeps the mount namespace, so a FUSE
  mount made there is visible everywhere — and ``nsenter`` execs the program, so the PID we
  hold is the program's: :meth:`NetLab.stop` signals it by PID (SIGTERM, then SIGKILL);
- :meth:`NetLab.counters` reads a host's interface counters (bytes on the wire, headers
  included) from ``ip -s -j link``.

Setup and teardown are bounded (every command has a timeout) and always happen: ``up()``
first deletes leftovers of a lab with the same prefix, registers ``down()`` with ``atexit``, and
``down()`` (also ``__exit__``) stops every process started through the lab before deleting the
namespaces (the veths go with them). :func:`exit_on_signals` turns SIGTERM/SIGHUP into
``SystemExit`` so ``finally`` blocks and ``atexit`` run when a benchmark is killed.

Run as a script it brings a lab up or down (``scripts/demo.sh`` uses it)::

    python bench/netlab.py up --prefix dff-demo- --hosts reg,h1,h2,h3 --rate 100mbit
    python bench/netlab.py down --prefix dff-demo-

``up`` prints one line per host: ``NAME NETNS IP``. Needs root and iproute2 (``ip``, ``tc``).
Errors are :class:`LabError` with the failing command's own message.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

from benchlib import stop_process

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SUBNET",
    "Host",
    "LabError",
    "NetLab",
    "exit_on_signals",
    "lab_available",
    "rate_bytes",
]

DEFAULT_PREFIX = "dff-"
DEFAULT_SUBNET = "10.215.1"
CMD_TIMEOUT = 30.0  # bound on one ip/tc command
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
_NAME = re.compile(r"[a-z][a-z0-9]{0,7}")


class LabError(RuntimeError):
    """The lab could not be set up or a command in it failed; the message says which."""


def rate_bytes(rate: str) -> float:
    """``tc`` rate (``100mbit``, ``24mbit``, ``1gbit``, ``500kbit``) in bytes per second."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(k|m|g)bit", rate)
    if not m:
        raise LabError(f"rate {rate!r}: use e.g. 100mbit")
    return float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] / 8


def _tbf_args(rate: str) -> list[str]:
    # tbf's burst must be >= rate/HZ; RECIPES §6 measured 256 KB at 100mbit (96 Mbit/s real).
    bps = rate_bytes(rate)
    burst = "256kb" if bps > 5e6 else "64kb"
    return ["tbf", "rate", rate, "burst", burst, "latency", "50ms"]


def _run(cmd: Sequence[str], *, timeout: float = CMD_TIMEOUT, check: bool = True) -> str:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(cmd[:4])}: no result after {timeout:.0f} s") from exc
    except OSError as exc:
        raise LabError(f"{cmd[0]}: {exc.strerror}") from exc
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed (exit {proc.returncode}): "
                       f"{(proc.stderr or proc.stdout).strip()[-300:]}")
    return proc.stdout


def lab_available() -> str | None:
    """``None`` when namespaces, veths, a bridge and tbf can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} not found (iproute2 / util-linux)"
    probe = NetLab(["a", "b"], prefix=f"dff-probe{os.getpid()}-", rate="100mbit")
    try:
        probe.up()
    except LabError as exc:
        return f"cannot build a namespace lab: {exc}"
    finally:
        probe.down()
    return None


@dataclass(frozen=True, slots=True)
class Host:
    """One host of the lab: its name, namespace, address and bridge-side port."""

    name: str
    netns: str
    ip: str
    port: str  # the veth end on the bridge (shaped towards the host)
    rate: str | None  # tbf rate both ways; None: unshaped

    def nsenter(self) -> list[str]:
        """Prefix a command with this to run it in the host's network namespace."""
        return ["nsenter", f"--net=/run/netns/{self.netns}"]


class NetLab:
    """Hosts on a bridge, each in its own network namespace; see the module docstring.

    ``hosts``: names (lowercase letters and digits, at most 8) in address order. ``rate``
    applies to every host unless ``rates`` names another (``None``: that link unshaped).
    """

    def __init__(self, hosts: Sequence[str], *, prefix: str = DEFAULT_PREFIX,
                 subnet: str = DEFAULT_SUBNET, rate: str | None = "100mbit",
                 rates: Mapping[str, str | None] | None = None) -> None:
        if not hosts or len(set(hosts)) != len(hosts) or len(hosts) > 250:
            raise LabError("hosts: 1 to 250 distinct names")
        for h in hosts:
            if not _NAME.fullmatch(h) or h == "br":
                raise LabError(f"host name {h!r}: lowercase letters/digits, at most 8, not br")
        if not re.fullmatch(r"\d{1,3}\.\d{1,3}\.\d{1,3}", subnet):
            raise LabError(f"subnet {subnet!r}: the first three octets, e.g. 10.215.1")
        for r in [rate, *(rates or {}).values()]:
            if r is not None:
                rate_bytes(r)
        self.prefix = prefix
        self.bridge = f"{prefix}br"
        self.hosts: dict[str, Host] = {
            h: Host(h, f"{prefix}{h}", f"{subnet}.{i + 1}", f"p{i + 1}",
                    (rates or {}).get(h, rate))
            for i, h in enumerate(hosts)}
        self._procs: list[subprocess.Popen[bytes]] = []
        self._atexit = False

    # ------------------------------------------------------------------ lifecycle

    def namespaces(self) -> list[str]:
        return [self.bridge, *(h.netns for h in self.hosts.values())]

    def up(self) -> NetLab:
        """Create the bridge, the hosts and their shaped links (about 0.1 s for 10 hosts)."""
        self.down()  # a run killed half-way left them: ours by name
        if not self._atexit:
            atexit.register(self.down)
            self._atexit = True
        try:
            _run(["ip", "netns", "add", self.bridge])
            _run(["ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", self.bridge, "link", "set", "br0", "up"])
            _run(["ip", "-n", self.bridge, "link", "set", "lo", "up"])
            for h in self.hosts.values():
                _run(["ip", "netns", "add", h.netns])
                # Created with its ends already in the two namespaces: no name in the root ns.
                _run(["ip", "link", "add", "eth0", "netns", h.netns, "type", "veth", "peer",
                      "name", h.port, "netns", self.bridge])
                _run(["ip", "-n", self.bridge, "link", "set", h.port, "master", "br0"])
                _run(["ip", "-n", self.bridge, "link", "set", h.port, "up"])
                _run(["ip", "-n", h.netns, "addr", "add", f"{h.ip}/24", "dev", "eth0"])
                _run(["ip", "-n", h.netns, "link", "set", "eth0", "up"])
                _run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
                self._shape(h, h.rate)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Stop every process started here (by PID), then delete the namespaces. Idempotent;
        never raises for what is already gone."""
        procs, self._procs = self._procs, []
        for proc in reversed(procs):
            self.stop(proc)
        for ns in reversed(self.namespaces()):
            if os.path.exists(f"/run/netns/{ns}"):
                _run(["ip", "netns", "del", ns], check=False)

    def __enter__(self) -> NetLab:
        return self.up()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    # ------------------------------------------------------------------ links

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise LabError(f"no host {name!r} (hosts: {', '.join(self.hosts)})") from None

    def _shape(self, h: Host, rate: str | None) -> None:
        for ns, dev in ((h.netns, "eth0"), (self.bridge, h.port)):
            _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
            if rate is not None:
                _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *_tbf_args(rate)])

    def shape(self, name: str, rate: str | None) -> None:
        """Change a host's link rate (both ways) live; ``None`` removes the shaping."""
        h = self.host(name)
        if rate is not None:
            rate_bytes(rate)
        self._shape(h, rate)
        self.hosts[name] = Host(h.name, h.netns, h.ip, h.port, rate)

    def counters(self, name: str) -> dict[str, int]:
        """The host's ``eth0`` counters: ``rx_bytes``, ``tx_bytes``, ``rx_packets``,
        ``tx_packets`` (wire bytes: Ethernet, IP and TCP headers included)."""
        out = _run(["ip", "-n", self.host(name).netns, "-s", "-j", "link", "show", "eth0"])
        try:
            stats = json.loads(out)[0]["stats64"]
            return {"rx_bytes": int(stats["rx"]["bytes"]), "tx_bytes": int(stats["tx"]["bytes"]),
                    "rx_packets": int(stats["rx"]["packets"]),
                    "tx_packets": int(stats["tx"]["packets"])}
        except (ValueError, LookupError, TypeError) as exc:
            raise LabError(f"ip -s -j link: unexpected output {out[:200]!r}") from exc

    def port_counters(self) -> dict[str, tuple[int, int]]:
        """Every host's ``(rx_bytes, tx_bytes)`` as the host sees them, from one ``ip -s -j
        link`` in the bridge namespace (its port's tx is what the host received): cheap
        enough to sample a whole lab several times a second."""
        out = _run(["ip", "-n", self.bridge, "-s", "-j", "link"])
        by_port = {h.port: name for name, h in self.hosts.items()}
        found: dict[str, tuple[int, int]] = {}
        try:
            for link in json.loads(out):
                name = by_port.get(link.get("ifname", ""))
                if name is not None:
                    st = link["stats64"]
                    found[name] = (int(st["tx"]["bytes"]), int(st["rx"]["bytes"]))
        except (ValueError, LookupError, TypeError) as exc:
            raise LabError(f"ip -s -j link: unexpected output {out[:200]!r}") from exc
        return found

    # ------------------------------------------------------------------ processes

    def run(self, name: str, argv: Sequence[str | os.PathLike[str]], *,
            timeout: float = 600.0, what: str | None = None) -> str:
        """Run a command in host ``name``'s network namespace; its stdout, or LabError with
        the tail of its stderr."""
        cmd = [*self.host(name).nsenter(), *map(str, argv)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  check=False, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{what or argv[0]} in {name}: no result after {timeout:.0f} s") \
                from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise LabError(f"{what or argv[0]} in {name} failed (exit {proc.returncode}): "
                           + " | ".join(tail))
        return proc.stdout

    def spawn(self, name: str, argv: Sequence[str | os.PathLike[str]], *, log: Path,
              env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running process in host ``name``'s namespace, stdout and stderr to
        ``log``; stopped by :meth:`stop` or at :meth:`down`."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen([*self.host(name).nsenter(), *map(str, argv)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True,
                                    env=None if env is None else dict(env))
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> int | None:
        """SIGTERM by PID, SIGKILL after ``grace`` seconds; the exit status."""
        if proc in self._procs:
            self._procs.remove(proc)
        return stop_process(proc, grace)

    def wait_port(self, name: str, host: str, port: int, timeout: float = 30.0) -> None:
        """Wait (bounded) until a TCP connect from host ``name`` to ``host:port`` succeeds."""
        probe = ("import socket, sys, time\n"
                 f"end = time.monotonic() + {timeout}\n"
                 "while time.monotonic() < end:\n"
                 "    try:\n"
                 f"        socket.create_connection(({host!r}, {port}), timeout=1).close()\n"
                 "        sys.exit(0)\n"
                 "    except OSError:\n"
                 "        time.sleep(0.05)\n"
                 "sys.exit(1)\n")
        try:
            self.run(name, [sys.executable, "-c", probe], timeout=timeout + 10,
                     what=f"connect to {host}:{port}")
        except LabError as exc:
            raise LabError(f"nothing answers on {host}:{port} from {name} after "
                           f"{timeout:.0f} s") from exc


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP raise ``SystemExit(128 + signo)``, so cleanups run when killed."""
    def handler(signo: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signo)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def _down_prefix(prefix: str) -> list[str]:
    """Delete every namespace whose name starts with ``prefix`` (a script's crash cleanup)."""
    gone = []
    for line in _run(["ip", "netns", "list"]).splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(prefix):
            _run(["ip", "netns", "del", ns], check=False)
            gone.append(ns)
    return gone


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="bring a shaped namespace lab up or down")
    ap.add_argument("action", choices=("up", "down"))
    ap.add_argument("--prefix", default=DEFAULT_PREFIX)
    ap.add_argument("--hosts", default="reg,h1,h2,h3", help="comma-separated host names")
    ap.add_argument("--subnet", default=DEFAULT_SUBNET)
    ap.add_argument("--rate", default="100mbit", help="tbf rate per link ('none': unshaped)")
    args = ap.parse_args(argv)
    if not args.prefix.startswith("dff-"):
        print("netlab: --prefix must start with dff-", file=sys.stderr)
        return 2
    try:
        if args.action == "down":
            _down_prefix(args.prefix)
            return 0
        lab = NetLab(args.hosts.split(","), prefix=args.prefix, subnet=args.subnet,
                     rate=None if args.rate == "none" else args.rate)
        t0 = time.monotonic()
        lab.up()
        atexit.unregister(lab.down)  # the lab outlives this process: `down` removes it
        for h in lab.hosts.values():
            print(h.name, h.netns, h.ip)
        print(f"netlab: {len(lab.hosts)} hosts up in {time.monotonic() - t0:.2f} s",
              file=sys.stderr)
    except LabError as exc:
        print(f"netlab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
