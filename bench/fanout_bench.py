"""Fan-out: N nodes read a whole ~200 MB image at once, straight from the registry vs through P2P.

The question DESIGN §4 asks of dfagent: when many nodes start the same image, does the registry
serve it about once, and do the nodes finish about as fast as their links allow? The lab
(:mod:`netlab`) puts every machine in its own network namespace on one bridge, each link shaped
both ways with ``tc tbf`` at ``--rate`` (default 100mbit = 12.5 MB/s):

- ``reg`` (10.215.1.1): a real ``docker-registry``; its uplink shaped like everyone's;
- ``sn`` (10.215.1.2): ``dfagent supernode`` (its own host, so its traffic is not counted as
  registry egress);
- ``h1`` .. ``hN`` (10.215.1.3 ...): the nodes.

The image (:func:`ensure_fanout_image`) is the python3 image of :mod:`oci_images` (5 layers
of Debian packages, ~65 MB compressed) plus one more layer of incompressible data files
(``/srv/data``, pseudo-random from a fixed seed: what model weights or media assets look like
to a compressor), sized so the converted nydusfs image is about ``--image-mb`` MB
(``/srv/data`` is 18 files of 8 MiB for the default 200). It is pushed
with skopeo and converted with ``nydusfs convert`` inside ``reg`` (loopback, unshaped) before
anything is measured.

Two methods, each sample starting from empty caches and stores on every node:

- ``registry`` (baseline): on every node at once ``nydusfs mount REF`` with ``backend:
  registry`` (plain HTTP), a fresh disk cache and ``prefetch: {all: true}``;
- ``p2p``: the supernode and one ``dfagent peer`` per node (fresh ``data_dir``), then on every
  node at once ``nydusfs mount REF`` with ``backend: dragonfly`` (the node's agent socket,
  fallback ``registry``) and ``prefetch: {all: true}``.

A node is complete when its mount's prefetch state is ``done`` (``nydusfs stat``: every chunk
of the image fetched and verified); the sample's time is from launching the N mount commands
to the last node complete. It is compared with the lower bound of DESIGN §6,
``max(S / u_src, N·S / (u_src + Σ u_i))``, S the image's blob bytes, u the link rates. Registry
egress is measured two ways: the HTTP body bytes the registry logged for blob GETs (what it
served), and the ``tx_bytes`` counter of its interface (everything on the wire, headers
included); both ÷ S. Each peer's ``dfagent_*`` metrics are scraped at the end of a P2P sample
(bytes by origin). A background thread (:class:`LinkTimeline`) reads every host's bytes in
and out from the bridge ports every 0.5 s: the report shows how busy the links were and
when. Medians over ``--runs``; the methods alternate round by round.

Stores on a tmpfs: every node's agent store (``data_dir``) and nydusfs disk cache live on a
tmpfs the benchmark mounts at ``WORKDIR/stores`` (``--stores disk``: under ``WORKDIR`` on
the disk). Neither the agents nor nydusfs fsync, so on a disk too their writes land in the
page cache and every read during a sample is served from it; what the tmpfs takes out is
the filesystem of the one VM disk all the simulated nodes share. This VM's is ext4 without
a journal, where creating an inode skips every inode of its block group deleted in the last
minute or more (``recently_deleted``), and each sample starts by deleting the previous one's
~21,000 chunk files: creates next to them took up to ~0.8 ms each, up to ~10% of the
machine's CPU in a sample (perf), in the agents' event loops. A node does not pull an image
into a store it emptied a second ago.

Every node runs ``nydusfs service`` for the whole benchmark, as a node runs its image daemon,
and both methods mount through it (``--no-service``: each mount starts its own daemon).
``--peer-log-level debug`` makes every peer log a state line per bulk fetch a second (with
``--keep``, the logs of the last sample stay under the work directory; with ``debug`` each
source piece is logged too). ``--peer-config YAML`` adds lines to every peer's config (tuning
runs, e.g. ``'fetch: {hedge_after: 4s}'``; recorded in the results). ``--rate 50mbit`` is
worth a run now and then: the protocol's timers (``fetch.peer_timeout``, ``leases.ttl``)
were once tuned to 100mbit only, and at 50mbit healthy peers got quarantined.

Machine note: every mount and every peer is a Python process, so N=8 is 16 processes plus the
registry and the supernode on 2 cores; the CPU time of the whole run is recorded next to the
results so a slow completion can be told apart from a slow protocol.

Raw samples go to ``bench/.cache/results/fanout.json`` (``--save-as NAME``: ``NAME.json``);
``report.py`` renders the section (:mod:`fanout_report`), with ``fanout-50mbit.json`` as a line
of its own when present. Needs root, /dev/fuse, iproute2, nsenter, umoci, skopeo,
docker-registry.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (
    CACHE_DIR,
    REPO_DIR,
    can_run,
    machine_info,
    median,
    process_alive,
    save_result,
)
from netlab import Host, LabError, NetLab, exit_on_signals, rate_bytes
from oci_images import BenchError, OciImage, ensure_image, run

from nydusfs.status import UnixHTTPConnection

__all__ = [
    "DATA_SEED",
    "LabCluster",
    "LinkTimeline",
    "MountHandle",
    "ensure_fanout_image",
    "lower_bound",
    "main",
    "registry_blob_bytes",
    "registry_blob_gets",
]

PY = sys.executable
NYDUSFS = [PY, "-m", "nydusfs.cli"]
DFAGENT = [PY, "-m", "dfagent.cli"]
REG_PORT, SN_PORT, PEER_PORT = 5000, 8001, 8002
REPO = "bench/fanout"
DATA_SEED = 20240215
DATA_FILE = 8 << 20  # bytes per data file in the extra layer
WAIT = 60.0
MB = 1e6


# --------------------------------------------------------------------------- the image


def data_files(image_mb: int, base: OciImage) -> int:
    """How many :data:`DATA_FILE` files bring the converted image to about ``image_mb`` MB:
    the converted python3 part is ~3/4 of its OCI size (zstd over 1 MiB chunks, dedup);
    random data converts 1:1."""
    want_data = image_mb * MB - 0.75 * base.layer_bytes()
    return max(0, round(want_data / DATA_FILE))


def ensure_fanout_image(image_mb: int, cache: Path = CACHE_DIR / "oci") -> OciImage:
    """The python3 image plus a layer of pseudo-random data files (module docstring), cached
    under ``cache/fanout-<MB>`` until the recipe changes."""
    base = ensure_image()
    files = data_files(image_mb, base)
    out = cache / f"fanout-{image_mb}"
    stamp = out / "recipe"
    recipe = f"1 {base.layout} {base.layer_bytes()} {files}x{DATA_FILE} seed {DATA_SEED}"
    layout = out / "layout"
    if stamp.exists() and stamp.read_text() == recipe and layout.is_dir():
        return OciImage(layout, base.tag, base.packages, (*base.layers, "data"))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copytree(base.layout, layout, symlinks=True)
    data = out / "data"
    data.mkdir()
    rng = random.Random(DATA_SEED)
    for i in range(files):
        (data / f"part-{i:03d}.bin").write_bytes(rng.randbytes(DATA_FILE))
    run(["umoci", "insert", "--image", f"{layout}:{base.tag}", "--history.created_by",
         f"add {files} data files of {DATA_FILE >> 20} MiB (seed {DATA_SEED})", str(data),
         "/srv/data"], what="umoci insert (data layer)")
    run(["umoci", "gc", "--layout", str(layout)])
    shutil.rmtree(data)
    stamp.write_text(recipe)
    image = OciImage(layout, base.tag, base.packages, (*base.layers, "data"))
    print(f"fanout_bench: image {image.source}: {image.layer_bytes() / MB:.1f} MB compressed "
          f"({files} data files of {DATA_FILE >> 20} MiB on top of the python3 image)",
          file=sys.stderr)
    return image


def mount_tmpfs(path: Path, size: int) -> None:
    """A tmpfs of at most ``size`` bytes at ``path`` (module doc, "Stores on a tmpfs")."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700",
                           "fanout-stores", str(path)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise BenchError(f"mount tmpfs at {path}: {proc.stderr.strip()} (--stores disk "
                         "keeps the stores on the disk)")


def unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=WAIT,
                       check=False)


def lower_bound(size: float, nodes: int, u_src: float, u_peer: float) -> float:
    """DESIGN §6: no schedule delivers S bytes to N nodes faster than this (seconds)."""
    return max(size / u_src, nodes * size / (u_src + nodes * u_peer))


_BLOB_GET = re.compile(r'"GET /v2/(?P<repo>\S+)/blobs/(?P<digest>sha256:[0-9a-f]{64})\S* '
                       r'HTTP/[\d.]+" (?P<status>\d{3}) (?P<size>\d+)')


def registry_blob_gets(log: Path, offset: int = 0) -> tuple[dict[str, tuple[int, int]], int]:
    """Blob digest -> (body bytes, requests) of the successful blob GETs in the registry's
    access log after byte ``offset`` (docker-registry writes the combined log format, with
    response sizes), and the log's new end offset."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read()
    except OSError:
        return {}, offset
    out: dict[str, tuple[int, int]] = {}
    for m in _BLOB_GET.finditer(text.decode(errors="replace")):
        if m["status"] in ("200", "206"):
            n, c = out.get(m["digest"], (0, 0))
            out[m["digest"]] = (n + int(m["size"]), c + 1)
    return out, offset + len(text)


def registry_blob_bytes(log: Path, offset: int = 0) -> tuple[int, int, int]:
    """(body bytes, requests, new offset) of all blob GETs after ``offset``."""
    gets, end = registry_blob_gets(log, offset)
    return sum(n for n, _ in gets.values()), sum(c for _, c in gets.values()), end


# --------------------------------------------------------------------------- processes in the lab


@dataclass
class MountHandle:
    """A ``nydusfs mount REF`` daemon started in a node's namespace; ``close()`` unmounts
    (``nydusfs umount``) and makes sure the daemon is gone (SIGKILL by PID if it hangs)."""

    node: str
    mnt: Path
    pid: int | None = None

    def status(self) -> dict[str, Any]:
        from nydusfs.status import query_status

        return query_status(self.mnt, timeout=10)

    def close(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run([*NYDUSFS, "umount", str(self.mnt)], capture_output=True,
                           timeout=WAIT, check=False)
        pid, self.pid = self.pid, None
        if pid is not None:
            deadline = time.monotonic() + WAIT
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if process_alive(pid):
                os.kill(pid, 9)
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, timeout=WAIT,
                           check=False)


@dataclass
class LabCluster:
    """Registry, supernode, peers and mounts as real processes in a :class:`NetLab`.

    Host names: ``reg`` (registry), ``sn`` (supernode), the rest nodes. Every process is
    started through the lab (so the lab's ``down()`` stops it by PID); mounts are closed by
    :meth:`close_mounts` / :meth:`close`. Files live under ``work/<host>/``, the nodes'
    stores and caches under ``stores/<host>/`` (``work`` unless given).
    """

    lab: NetLab
    work: Path
    stores: Path | None = None
    registry: subprocess.Popen[bytes] | None = None
    supernode: subprocess.Popen[bytes] | None = None
    peers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    mounts: dict[str, MountHandle] = field(default_factory=dict)
    peer_log_level: str = "info"
    peer_extra: str = ""  # more YAML for every peer's config (``--peer-config``)
    services: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def nodes(self) -> list[str]:
        return [h for h in self.lab.hosts if h not in ("reg", "sn")]

    def store_dir(self, node: str) -> Path:
        return (self.stores if self.stores is not None else self.work) / node

    def h(self, name: str) -> Host:
        return self.lab.host(name)

    @property
    def registry_addr(self) -> str:
        return f"{self.h('reg').ip}:{REG_PORT}"

    @property
    def supernode_url(self) -> str:
        return f"http://{self.h('sn').ip}:{SN_PORT}"

    def registry_log(self) -> Path:
        return self.work / "reg" / "registry.log"

    # -- registry

    def start_registry(self, storage: Path) -> None:
        d = self.work / "reg"
        d.mkdir(parents=True, exist_ok=True)
        storage.mkdir(parents=True, exist_ok=True)
        cfg = d / "config.yml"
        cfg.write_text(
            "version: 0.1\n"
            "log: {level: warn, accesslog: {disabled: false}}\n"
            f"storage: {{filesystem: {{rootdirectory: {storage}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: '{self.registry_addr}'}}\n")
        self.registry = self.lab.spawn("reg", ["docker-registry", "serve", str(cfg)],
                                       log=self.registry_log())
        self._wait_http("reg", f"http://{self.registry_addr}/v2/", "docker-registry",
                        self.registry, self.registry_log())

    def _wait_http(self, host: str, url: str, what: str, proc: subprocess.Popen[bytes],
                   log: Path, timeout: float = WAIT) -> None:
        probe = ("import sys, time, urllib.request, urllib.error\n"
                 f"end = time.monotonic() + {timeout}\n"
                 "while time.monotonic() < end:\n"
                 "    try:\n"
                 f"        urllib.request.urlopen({url!r}, timeout=2).close(); sys.exit(0)\n"
                 "    except urllib.error.HTTPError:\n"
                 "        sys.exit(0)\n"
                 "    except OSError:\n"
                 "        time.sleep(0.05)\n"
                 "sys.exit(1)\n")
        try:
            self.lab.run(host, [PY, "-c", probe], timeout=timeout + 10, what=f"wait for {what}")
        except LabError:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:] \
                if log.exists() else []
            state = "exited" if proc.poll() is not None else "running"
            raise BenchError(f"{what} ({state}) did not answer {url}: "
                             + " | ".join(tail)) from None

    # -- supernode and peers

    def _wait_log(self, log: Path, line: str, what: str, proc: subprocess.Popen[bytes],
                  timeout: float = WAIT) -> None:
        """Wait (bounded) until ``log`` holds ``line`` (what dfagent logs once it listens)."""
        deadline = time.monotonic() + timeout
        while True:
            text = log.read_text(errors="replace") if log.exists() else ""
            if line in text:
                return
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = " | ".join(text.strip().splitlines()[-5:])
                state = f"exit {proc.returncode}" if proc.poll() is not None else "no answer"
                raise BenchError(f"{what} did not start ({state}): {tail}")
            time.sleep(0.05)

    def start_supernode(self, extra: str = "") -> None:
        d = self.work / "sn"
        d.mkdir(parents=True, exist_ok=True)
        cfg = d / "supernode.yaml"
        cfg.write_text(f"listen: {self.h('sn').ip}:{SN_PORT}\n{extra}")
        log = d / "supernode.log"
        log.unlink(missing_ok=True)
        self.supernode = self.lab.spawn("sn", [*DFAGENT, "supernode", "--config", str(cfg)],
                                        log=log)
        self._wait_log(log, "listening on", "dfagent supernode", self.supernode)

    def peer_socket(self, node: str) -> Path:
        return self.work / node / "agent.sock"

    def start_peer(self, node: str, extra: str = "") -> None:
        """``dfagent peer`` in ``node``'s namespace with a fresh store; ``extra``: more YAML."""
        d = self.work / node
        data = self.store_dir(node) / "peer-data"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        ip = self.h(node).ip
        cfg = d / "peer.yaml"
        cfg.write_text(
            f"id: {node}\n"
            f"supernodes: [{self.supernode_url}]\n"
            f"listen: {ip}:{PEER_PORT}\n"
            f"advertise: http://{ip}:{PEER_PORT}\n"
            f"socket: {self.peer_socket(node)}\n"
            f"data_dir: {data}\n"
            "quota: 4GiB\n"
            f"{self.peer_extra}{extra}")
        log = d / "peer.log"
        log.unlink(missing_ok=True)
        self.peers[node] = self.lab.spawn(node, [*DFAGENT, "--log-level", self.peer_log_level,
                                                 "peer", "--config", str(cfg)], log=log)

    def wait_peers(self) -> None:
        """Every peer listens and is registered at the supernode (bounded)."""
        for node, proc in self.peers.items():
            self._wait_log(self.work / node / "peer.log", "listening on",
                           f"dfagent peer {node}", proc)
        deadline = time.monotonic() + WAIT
        for node in self.peers:
            while not (self.peer_status(node).get("supernode") or {}).get("connected"):
                if time.monotonic() > deadline:
                    raise BenchError(f"dfagent peer {node}: not registered at the supernode")
                time.sleep(0.1)

    def peer_request(self, node: str, path: str) -> bytes:
        """GET ``path`` on ``node``'s agent local API (its Unix socket, reachable from here)."""
        conn = UnixHTTPConnection(self.peer_socket(node), 30.0)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
        except OSError as exc:
            raise BenchError(f"dfagent peer {node}: GET {path}: {exc}") from exc
        finally:
            conn.close()
        if resp.status != 200:
            raise BenchError(f"dfagent peer {node}: GET {path}: HTTP {resp.status}")
        return body

    def peer_status(self, node: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.peer_request(node, "/api/v1/status"))
        return doc

    def peer_metrics(self, node: str) -> str:
        return self.peer_request(node, "/metrics").decode()

    def supernode_peer(self, peer_id: str) -> dict[str, Any] | None:
        """The supernode's view of a peer (``GET /api/v1/peers/ID`` from inside ``sn``);
        ``None`` when it does not know the peer."""
        url = f"{self.supernode_url}/api/v1/peers/{peer_id}"
        probe = ("import sys, urllib.request, urllib.error\n"
                 "try:\n"
                 f"    print(urllib.request.urlopen({url!r}, timeout=10).read().decode())\n"
                 "except urllib.error.HTTPError as e:\n"
                 "    print('null') if e.code == 404 else sys.exit(f'HTTP {e.code}')\n")
        doc: dict[str, Any] | None = json.loads(
            self.lab.run("sn", [PY, "-c", probe], timeout=60, what=f"GET {url}"))
        return doc

    def stop_peers(self) -> None:
        for node in list(self.peers):
            self.lab.stop(self.peers.pop(node))

    def stop_supernode(self) -> None:
        if self.supernode is not None:
            self.lab.stop(self.supernode)
            self.supernode = None

    # -- mounts

    def mount_config(self, node: str, backend: str, *, prefetch_all: bool = True) -> Path:
        d = self.work / node
        d.mkdir(parents=True, exist_ok=True)
        cache = self.store_dir(node) / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        lines = []
        if backend == "registry":
            lines += ["backend:", "  type: registry", "  registry: {plain_http: true}",
                      f"cache: {{enabled: true, dir: {cache}}}"]
        elif backend == "dragonfly":
            lines += ["backend:", "  type: dragonfly", "  registry: {plain_http: true}",
                      f"  dragonfly: {{socket: {self.peer_socket(node)}, fallback: registry}}"]
        else:
            raise BenchError(f"unknown backend {backend}")
        if prefetch_all:
            lines.append("prefetch: {all: true}")
        cfg = d / f"mount-{backend}.yaml"
        cfg.write_text("\n".join(lines) + "\n")
        return cfg

    def service_socket(self, node: str) -> Path:
        return self.work / node / "service.sock"

    def start_services(self) -> None:
        """``nydusfs service`` (the resident mount service) on every node, as a node runs it
        next to its agent: mounts are forked from a process that has imported everything,
        not started from scratch by eight ``nydusfs mount`` commands sharing two cores."""
        for node in self.nodes:
            sock = self.service_socket(node)
            sock.unlink(missing_ok=True)
            self.services[node] = self.lab.spawn(
                node, [*NYDUSFS, "service", "--socket", str(sock)],
                log=self.work / node / "service.log")
        deadline = time.monotonic() + WAIT
        for node, proc in self.services.items():
            while not self.service_socket(node).exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"nydusfs service on {node} did not start: "
                                     f"{(self.work / node / 'service.log').read_text()[-300:]}")
                time.sleep(0.05)

    def stop_services(self) -> None:
        for node in list(self.services):
            self.lab.stop(self.services.pop(node))

    def mount_all(self, ref: str, configs: dict[str, Path]) -> None:
        """``nydusfs mount REF --background`` on every node in ``configs`` at once (through
        the node's mount service when :meth:`start_services` ran)."""
        procs: dict[str, subprocess.Popen[str]] = {}
        for node, cfg in configs.items():
            mnt = self.work / node / "mnt"
            mnt.mkdir(parents=True, exist_ok=True)
            self.mounts[node] = MountHandle(node, mnt)
            how = (["--service", "always", "--service-socket", str(self.service_socket(node))]
                   if node in self.services else ["--service", "never"])
            procs[node] = subprocess.Popen(
                [*self.h(node).nsenter(), *NYDUSFS, "mount", ref, str(mnt), "--config",
                 str(cfg), "--background", *how], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        errors = []
        for node, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=WAIT * 2)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                errors.append(f"{node}: nydusfs mount did not return")
                continue
            m = re.search(r"daemon pid (\d+)", out)
            if m:
                self.mounts[node].pid = int(m[1])
            if proc.returncode != 0 or not os.path.ismount(self.mounts[node].mnt):
                errors.append(f"{node}: nydusfs mount exit {proc.returncode}: "
                              f"{err.strip()[-300:]}")
        if errors:
            raise BenchError("; ".join(errors))

    def close_mounts(self) -> None:
        for node in list(self.mounts):
            self.mounts.pop(node).close()

    def close(self) -> None:
        self.close_mounts()
        self.stop_services()
        self.stop_peers()
        self.stop_supernode()
        if self.registry is not None:
            self.lab.stop(self.registry)
            self.registry = None


# --------------------------------------------------------------------------- one sample


class LinkTimeline:
    """Bytes each host received and sent per ``interval`` during a sample, read from the lab's
    bridge ports by a background thread (one ``ip -s -j link`` per tick).

    Why: completion time alone does not say whether the links were busy. The timeline shows
    how close each node's downlink came to its rate, and when: a slow start, a gap in the
    middle, or a long tail once the registry is done (``utilization``)."""

    def __init__(self, lab: NetLab, interval: float = 0.5, limit: float = 900.0) -> None:
        self.lab = lab
        self.interval = interval
        self.limit = limit  # seconds: the sampler stops by itself after this
        self.ticks: list[tuple[float, dict[str, tuple[int, int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="link-timeline", daemon=True)

    def start(self) -> LinkTimeline:
        self._t0 = time.perf_counter()
        self.ticks.append((0.0, self.lab.port_counters()))
        self._thread.start()
        return self

    def _run(self) -> None:
        for _ in range(int(self.limit / self.interval)):
            if self._stop.wait(self.interval):
                return
            try:
                self.ticks.append((time.perf_counter() - self._t0, self.lab.port_counters()))
            except LabError:
                return

    def stop(self) -> dict[str, Any]:
        """Stop sampling; per host, the bytes received (``rx``) and sent (``tx``) in each
        interval from the start (``t``: the end of each interval, seconds)."""
        self._stop.set()
        self._thread.join(timeout=10)
        ticks = self.ticks
        hosts = list(ticks[0][1])
        out: dict[str, Any] = {"t": [round(t, 2) for t, _ in ticks[1:]],
                               "rx": {h: [] for h in hosts}, "tx": {h: [] for h in hosts}}
        for (_, a), (_, b) in itertools.pairwise(ticks):
            for h in hosts:
                if h in a and h in b:
                    out["rx"][h].append(b[h][0] - a[h][0])
                    out["tx"][h].append(b[h][1] - a[h][1])
        return out


def utilization(timeline: dict[str, Any], done: dict[str, float], rate: float) -> dict[str, float]:
    """Per node, the bytes its downlink carried until it was done ÷ what the link could carry
    in that time (``rate`` bytes/s): 1.0 is a link busy from start to finish."""
    t = timeline["t"]
    out: dict[str, float] = {}
    for node, end in done.items():
        rx = timeline["rx"].get(node, [])
        got = sum(n for ti, n in zip(t, rx, strict=False) if ti <= end + 0.5)
        out[node] = got / (rate * end) if end > 0 else 0.0
    return out


def wait_prefetch(cluster: LabCluster, t0: float, timeout: float) -> dict[str, float]:
    """Seconds from ``t0`` until each node's mount reported prefetch ``done``."""
    done: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(done) < len(cluster.mounts):
        for node, m in cluster.mounts.items():
            if node in done:
                continue
            try:
                p = m.status().get("prefetch") or {}
            except Exception as exc:  # a NydusfsError: the daemon died
                raise BenchError(f"{node}: nydusfs stat: {exc}") from exc
            if p.get("state") == "done":
                done[node] = time.perf_counter() - t0
            elif p.get("state") in ("failed", "cancelled"):
                raise BenchError(f"{node}: prefetch {p.get('state')}: {p}")
        if time.monotonic() > deadline:
            missing = sorted(set(cluster.mounts) - set(done))
            raise BenchError(f"prefetch not done after {timeout:.0f} s on {', '.join(missing)}")
        time.sleep(0.2)
    return done


_METRIC = re.compile(r'^(dfagent_[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$', re.M)



def parse_metrics(text: str, prefix: str = "dfagent_") -> dict[str, float]:
    """``name{labels}`` -> value for every sample line starting with ``prefix``."""
    out: dict[str, float] = {}
    for m in _METRIC.finditer(text):
        if m[1].startswith(prefix) and not m[1].endswith("_created"):
            out[m[1] + (m[2] or "")] = float(m[3])
    return out


def _cpu_seconds() -> float:
    """CPU seconds used by the whole machine so far (user + system), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system = (int(x) for x in fields[:3])
    irq, softirq = int(fields[5]), int(fields[6])
    return (user + nice + system + irq + softirq) / ticks


def sample(cluster: LabCluster, method: str, ref: str, timeout: float) -> dict[str, Any]:
    """One sample of ``method`` (``registry`` or ``p2p``) from empty caches and stores."""
    if method == "p2p":
        try:
            cluster.start_supernode()
            for node in cluster.nodes:
                cluster.start_peer(node)
            cluster.wait_peers()
        except BaseException:  # the sample may be taken again: nothing may hold the ports
            cluster.stop_peers()
            cluster.stop_supernode()
            raise
        configs = {n: cluster.mount_config(n, "dragonfly") for n in cluster.nodes}
    else:
        configs = {n: cluster.mount_config(n, "registry") for n in cluster.nodes}
    tx0 = cluster.lab.counters("reg")["tx_bytes"]
    _, _, log_off = registry_blob_bytes(cluster.registry_log())
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    shaped = cluster.h(cluster.nodes[0]).rate
    link = rate_bytes(shaped) if shaped else 0.0
    links = LinkTimeline(cluster.lab).start()
    timeline: dict[str, Any] = {}
    try:
        cluster.mount_all(ref, configs)
        t_mounted = time.perf_counter() - t0
        done = wait_prefetch(cluster, t0, timeout)
        elapsed = max(done.values())
        cpu = _cpu_seconds() - cpu0
        wire = cluster.lab.counters("reg")["tx_bytes"] - tx0
        served, gets, _ = registry_blob_bytes(cluster.registry_log(), log_off)
        statuses = {n: m.status() for n, m in cluster.mounts.items()}
        metrics: dict[str, dict[str, float]] = {}
        if method == "p2p":
            for node in cluster.nodes:
                metrics[node] = parse_metrics(cluster.peer_metrics(node))
    finally:
        timeline = links.stop()
        cluster.close_mounts()
        if method == "p2p":
            cluster.stop_peers()
            cluster.stop_supernode()
    return {
        "seconds": elapsed, "mounted_s": t_mounted, "node_seconds": done,
        "registry_wire_bytes": wire, "registry_served_bytes": served, "registry_gets": gets,
        "cpu_s": cpu,
        "fetched_bytes": {n: (s.get("backend_counters") or {}).get("bytes_read")
                          for n, s in statuses.items()},
        "prefetch": {n: s.get("prefetch") for n, s in statuses.items()},
        "dragonfly": {n: s.get("dragonfly") for n, s in statuses.items() if s.get("dragonfly")},
        "peer_metrics": metrics,
        "timeline": timeline,
        "downlink_utilization": utilization(timeline, done, link) if link else {},
    }


# --------------------------------------------------------------------------- main


def prepare(cluster: LabCluster, image: OciImage) -> dict[str, Any]:
    """Push and convert inside ``reg`` (loopback there: unshaped, not on its eth0)."""
    storage = cluster.work / "reg" / "data"
    cluster.start_registry(storage)
    oci_ref = f"{cluster.registry_addr}/{REPO}:oci"
    nydus_ref = f"{cluster.registry_addr}/{REPO}:nydus"
    cluster.lab.run("reg", ["skopeo", "copy", "-q", "--dest-tls-verify=false", image.source,
                            f"docker://{oci_ref}"], what="skopeo copy")
    out = cluster.lab.run("reg", [*NYDUSFS, "convert", "--plain-http", "--json", oci_ref,
                                  nydus_ref], what="nydusfs convert")
    summary = json.loads(out)
    man = json.loads(cluster.lab.run("reg", ["skopeo", "inspect", "--raw", "--tls-verify=false",
                                             f"docker://{nydus_ref}"], what="skopeo inspect"))
    layers = man["layers"]
    return {"ref": nydus_ref, "oci_bytes": image.layer_bytes(),
            "blob_bytes": sum(int(x["size"]) for x in layers[:-1]),
            "bootstrap_bytes": int(layers[-1]["size"]), "blobs": len(layers) - 1,
            "convert": {k: v for k, v in summary.items()
                        if isinstance(v, int | float | str) and not isinstance(v, bool)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3, help="samples per method (median)")
    ap.add_argument("--rate", default="100mbit", help="tbf rate of every link")
    ap.add_argument("--image-mb", type=int, default=200, help="image size, MB compressed")
    ap.add_argument("--methods", default="registry,p2p")
    ap.add_argument("--workdir", type=Path, default=CACHE_DIR / "fanout")
    ap.add_argument("--save-as", default="fanout", metavar="NAME",
                    help="results file bench/.cache/results/NAME.json (default fanout; "
                         "report.py also shows fanout-50mbit: "
                         "--rate 50mbit --methods p2p --save-as fanout-50mbit)")
    ap.add_argument("--peer-config", default="", metavar="YAML",
                    help="more lines for every peer's config, e.g. 'fetch: {hedge_after: 4s}' "
                         "(tuning experiments; recorded in the results)")
    ap.add_argument("--peer-log-level", default="info",
                    help="the peers' --log-level (debug: a state line per bulk fetch a second)")
    ap.add_argument("--stores", choices=("tmpfs", "disk"), default="tmpfs",
                    help="where the nodes' stores and caches live (module doc)")
    ap.add_argument("--no-service", action="store_true",
                    help="mount with `--service never` (no resident `nydusfs service` per node)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work directory (logs of the last sample) at the end")
    args = ap.parse_args(argv)
    if not can_run("fanout_bench", ("ip", "tc", "nsenter", "umoci", "skopeo", "docker-registry")):
        return 1
    if not 1 <= args.nodes <= 60:
        print("fanout_bench: --nodes 1..60", file=sys.stderr)
        return 2
    methods = [m for m in args.methods.split(",") if m]
    if not set(methods) <= {"registry", "p2p"}:
        print("fanout_bench: --methods: registry, p2p", file=sys.stderr)
        return 2
    exit_on_signals()
    u = rate_bytes(args.rate)
    nodes = [f"h{i}" for i in range(1, args.nodes + 1)]
    work: Path = args.workdir
    unmount(work / "stores")  # left by a run that was killed
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    samples: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    discarded: list[dict[str, Any]] = []  # samples that failed and were taken again
    lab = NetLab(["reg", "sn", *nodes], rate=args.rate)
    stores = work / "stores" if args.stores == "tmpfs" else None
    cluster = LabCluster(lab, work, stores, peer_log_level=args.peer_log_level,
                         peer_extra=args.peer_config.strip() + "\n" if args.peer_config else "")
    t_start = time.monotonic()
    try:
        image = ensure_fanout_image(args.image_mb)
        if stores is not None:  # room for a store and a cache of the image per node
            mount_tmpfs(stores, int(2 * args.nodes * (args.image_mb + 64) * MB))
        lab.up()
        prep = prepare(cluster, image)
        if not args.no_service:
            cluster.start_services()
        size = prep["blob_bytes"]
        lb = lower_bound(size, args.nodes, u, u)
        timeout = max(300.0, 4 * args.nodes * size / u)
        print(f"fanout_bench: {args.nodes} nodes at {args.rate}; image {size / MB:.1f} MB in "
              f"{prep['blobs']} blobs; lower bound {lb:.1f} s", file=sys.stderr)
        for rnd in range(args.runs):
            order = methods if rnd % 2 == 0 else methods[::-1]
            for method in order:
                for attempt in range(2):  # a sample that failed is taken again, once
                    try:
                        s = sample(cluster, method, prep["ref"], timeout)
                        break
                    except BenchError as exc:
                        if attempt:
                            raise
                        discarded.append({"method": method, "round": rnd + 1,
                                          "error": str(exc)})
                        print(f"round {rnd + 1}/{args.runs} {method:8} failed ({exc}); "
                              "taking it again", file=sys.stderr)
                samples[method].append(s)
                print(f"round {rnd + 1}/{args.runs} {method:8} {s['seconds']:7.1f} s "
                      f"(x{s['seconds'] / lb:.2f} bound); registry served "
                      f"{s['registry_served_bytes'] / size:.2f}x image, wire "
                      f"{s['registry_wire_bytes'] / size:.2f}x; CPU {s['cpu_s']:.0f} s",
                      file=sys.stderr)
    except (BenchError, LabError) as exc:
        print(f"fanout_bench: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.close()
        lab.down()
        if stores is not None:
            unmount(stores)

    def med(method: str, key: Callable[[dict[str, Any]], float]) -> float:
        return median([key(s) for s in samples[method]])

    medians = {m: {"seconds": med(m, lambda s: s["seconds"]),
                   "served_ratio": med(m, lambda s: s["registry_served_bytes"] / size),
                   "wire_ratio": med(m, lambda s: s["registry_wire_bytes"] / size),
                   "time_ratio": med(m, lambda s: s["seconds"] / lb),
                   "cpu_s": med(m, lambda s: s["cpu_s"])}
               for m in methods}
    result: dict[str, Any] = {
        "machine": machine_info(),
        "command": "make bench-fanout   # .venv/bin/python bench/fanout_bench.py --runs N",
        "params": {"nodes": args.nodes, "rate": args.rate, "rate_bytes": u,
                   "image_mb": args.image_mb, "data_file": DATA_FILE, "seed": DATA_SEED,
                   "data_files": data_files(args.image_mb, ensure_image()),
                   "packages": " ".join(image.packages), "layers": list(image.layers),
                   "mount_service": not args.no_service, "peer_config": args.peer_config,
                   "stores": args.stores},
        "runs": args.runs,
        "image": prep,
        "lower_bound_s": lb,
        "bounds": {"source": size / u, "swarm": args.nodes * size / (u + args.nodes * u),
                   "registry_only": args.nodes * size / u},
        "methods": methods,
        "discarded": discarded,
        "samples": samples,
        "medians": medians,
        "wall_s": time.monotonic() - t_start,
    }
    path = save_result(args.save_as, result)
    for m, x in medians.items():
        print(f"{m}: {x['seconds']:.1f} s = x{x['time_ratio']:.2f} bound; registry served "
              f"x{x['served_ratio']:.3f} image (wire x{x['wire_ratio']:.3f})", file=sys.stderr)
    print(f"raw results in {path.relative_to(REPO_DIR)}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
