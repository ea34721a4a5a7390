"""Cold start of a python3 container over a shaped link: nydusfs lazy mount vs full pull.

Two network namespaces joined by one veth pair, both ends shaped with ``tc tbf`` (RECIPES §6):
``dfb-reg`` (10.214.77.1) runs a real ``docker-registry``, ``dfb-node`` (10.214.77.2) is the
machine starting the container. The link runs at each ``--rates`` value (default 24mbit =
3 MB/s and 100mbit = 12.5 MB/s). Processes are put in a namespace with ``nsenter --net``,
which keeps the mount namespace (``ip netns exec`` would not: a FUSE mount made there would be
invisible here).

The image is the python3 image of :mod:`oci_images` (the ``bench/rootfs.sh`` packages, 5
layers), pushed once with skopeo and converted once with ``nydusfs convert`` before the link
is shaped, with :data:`CONVERT_FLAGS` (``--chunk-size 256K --zstd-level 19``: what an image
meant to start over slow links is converted with; level 19 makes the chunks a start fetches
~15% smaller than the default level 3 and the conversion ~6x slower, the chunk size hardly
matters either way: measured in docs/benchmarks.md). Its Cmd runs ``/app/main.py``: ``import
json, email, http.client; print("ready")``. The time measured is from the first command until
that line arrives on runc's stdout:

- ``full``: ``skopeo copy docker://REG/bench/python:oci oci:LAYOUT:t`` (in ``dfb-node``), then
  ``umoci unpack`` (which writes the runc bundle with the image's config), then ``runc run``;
- ``nydusfs``: ``nydusfs mount REG/bench/python:nydus MNT --background`` (in ``dfb-node``;
  backend ``registry`` with ``plain_http: true``, an empty disk cache, an access trace), an
  overlay (tmpfs upper) over the mount, then ``runc run`` with the same Cmd/Env/WorkingDir;
- ``nydusfs-prefetch``: the same with an image converted with ``--prefetch TRACE``, TRACE being
  the access trace of one unmeasured start (a profiling run, as a user would make it): those
  files' chunks come first in the blob and the mount fetches them in the background at once;
- ``nydusfs-service`` / ``nydusfs-prefetch-service``: the same two, the mount handed to the
  resident mount service (``nydusfs service``, nydusfs/service.py), which forks the daemon
  from a process that has imported everything already. The service is started once in
  ``dfb-node`` before the samples and is not timed, as nydusd/nydus-snapshotter and the stargz
  snapshotter run before a container starts; the rows without ``-service`` pass
  ``--service never`` (the client forks its own daemon, as without a service). The page cache
  is still dropped before every sample, also the service's pages (its shared libraries, the
  Python modules it imported): what stays warm is only what a resident process keeps mapped
  and the kernel did not evict.

Before every sample the page cache is dropped and every cache the method has is fresh (new
OCI layout and bundle; new nydusfs cache directory), so each run is a cold start.

Bytes are measured three ways: on the wire (the registry end's veth ``tx_bytes``, i.e. all
HTTP/TCP traffic to the node, including manifests and the bootstrap); fetched by the mount's
backend (``nydusfs stat --json``: ``backend_counters.bytes_read``, compressed chunk bytes); and
read by the workload: the bytes the kernel asked the FUSE filesystem for
(``read.bytes_read``; includes the kernel's readahead; the overlay passes reads through). The
goal compares bytes fetched to bytes read; the decompressed size of the chunks fetched (the
disk cache's ``bytes_stored``, every fetched chunk is stored once) is recorded too, for the
amplification from chunk granularity alone. The files in the access trace and their sizes (in
an umoci-unpacked copy of the image) are kept in the raw results as ``trace_files`` /
``trace_file_bytes``.

Where the time goes: each nydusfs sample keeps a ``timeline`` in seconds from the first
command: the mount daemon's own marks from ``nydusfs stat --json`` (``process_start`` of the
``nydusfs mount`` command, ``mount_start``, ``manifest``, ``bootstrap``, ``ready`` = FUSE up,
``first_read`` / ``last_read`` through FUSE) and this script's (``mount_returned``,
``runc_start``, ``ready_line``).

Raw samples go to ``bench/.cache/results/coldstart.json``; ``report.py`` renders the medians.
Needs root, /dev/fuse, runc, umoci, skopeo, docker-registry, ``tc`` with tbf.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
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
    drop_caches,
    machine_info,
    median,
    process_alive,
    save_result,
    stop_process,
    tool_version,
)
from oci_images import (
    BenchError,
    OciImage,
    Registry,
    ensure_image,
    manifest_sizes,
    netns_prefix,
    push,
    raw_manifest,
    run,
)

NYDUSFS = [sys.executable, "-m", "nydusfs.cli"]
REG_NS, NODE_NS = "dfb-reg", "dfb-node"
REG_IP, NODE_IP = "10.214.77.1", "10.214.77.2"
REG_ADDR = f"{REG_IP}:5000"
METHODS = ("full", "nydusfs", "nydusfs-prefetch", "nydusfs-service", "nydusfs-prefetch-service")
OCI_REPO, NYDUS_REPO = "bench/python:oci", "bench/python:nydus"
PREFETCH_REPO = "bench/python:nydus-prefetch"
# How the nydusfs images are converted (see the module docstring).
CONVERT_FLAGS = ("--chunk-size", "256K", "--zstd-level", "19")
READY = "ready"
STEP_TIMEOUT = 600.0  # bound on one step (a pull at 3 MB/s of ~65 MB takes ~25 s)
WAIT = 60.0


def mbit_to_bytes(rate: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(k|m|g)bit", rate)
    if not m:
        raise SystemExit(f"coldstart_bench: rate {rate!r}: use e.g. 24mbit")
    return float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] / 8


# --------------------------------------------------------------------------- the link


class Link:
    """Two namespaces and a veth pair between them; ``down()`` deletes both namespaces."""

    def up(self) -> None:
        self.down()  # a previous run killed half-way left them: ours by name
        run(["ip", "netns", "add", REG_NS])
        run(["ip", "netns", "add", NODE_NS])
        run(["ip", "link", "add", "eth0", "netns", REG_NS, "type", "veth", "peer", "name",
             "eth0", "netns", NODE_NS])
        for ns, ip in ((REG_NS, REG_IP), (NODE_NS, NODE_IP)):
            run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def shape(self, rate: str | None) -> None:
        """tbf at ``rate`` on both ends' egress (``None``: unshaped)."""
        for ns in (REG_NS, NODE_NS):
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", "eth0", "root"],
                           capture_output=True, timeout=30, check=False)
            if rate is not None:
                # burst must be >= rate/HZ; 256 KB is what RECIPES §6 measured at 100mbit.
                burst = "256kb" if mbit_to_bytes(rate) > 5e6 else "64kb"
                run(["tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate,
                     "burst", burst, "latency", "50ms"])

    def tx_bytes(self, ns: str = REG_NS) -> int:
        out = run(["ip", "-n", ns, "-s", "-j", "link", "show", "eth0"], timeout=30)
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    def down(self) -> None:
        for ns in (NODE_NS, REG_NS):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30,
                           check=False)


# --------------------------------------------------------------------------- helpers


def _mount(*args: str) -> None:
    run(["mount", *args], timeout=30, what=f"mount {args[-1]}")


def _umount(target: Path) -> None:
    if os.path.ismount(target):
        proc = subprocess.run(["umount", str(target)], capture_output=True, timeout=30,
                              check=False)
        if proc.returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30,
                           check=False)


def _wait_until(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Runc:
    """``runc`` with a private state dir; every container it starts is deleted by id."""

    state: Path
    n: int = 0
    ids: list[str] = field(default_factory=list)

    def run_until_ready(self, bundle: Path, t0: float) -> tuple[float, str]:
        """``runc run``; seconds from ``t0`` until the ready line; and the container's stdout."""
        self.n += 1
        cid = f"dfb-cold-{os.getpid()}-{self.n}"
        self.ids.append(cid)
        proc = subprocess.Popen(["runc", "--root", str(self.state), "run", "--bundle",
                                 str(bundle), cid], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        killer = threading.Timer(STEP_TIMEOUT, proc.kill)
        killer.start()
        ready_at: float | None = None
        lines: list[str] = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if ready_at is None and line.strip() == READY:
                    ready_at = time.perf_counter()
            _, err = proc.communicate(timeout=WAIT)
        finally:
            killer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=WAIT)
            self.delete(cid)
        if proc.returncode != 0 or ready_at is None:
            raise BenchError(f"runc run {cid}: exit {proc.returncode}, stdout "
                             f"{''.join(lines)[-200:]!r}, stderr {err.strip()[-300:]!r}")
        return ready_at - t0, "".join(lines)

    def delete(self, cid: str) -> None:
        subprocess.run(["runc", "--root", str(self.state), "delete", "--force", cid],
                       capture_output=True, timeout=WAIT, check=False)

    def close(self) -> None:
        for cid in self.ids:
            self.delete(cid)
        shutil.rmtree(self.state, ignore_errors=True)


def bundle_config(image_config: dict[str, Any], template: dict[str, Any],
                  root: Path) -> dict[str, Any]:
    """A runc config for ``root`` running the image's Cmd with its Env and WorkingDir."""
    cfg: dict[str, Any] = json.loads(json.dumps(template))
    c = image_config.get("config", {})
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = [*c.get("Entrypoint", []), *c.get("Cmd", [])]
    cfg["process"]["env"] = c.get("Env", cfg["process"]["env"])
    cfg["process"]["cwd"] = c.get("WorkingDir") or "/"
    cfg["root"] = {"path": str(root), "readonly": False}
    return cfg


# --------------------------------------------------------------------------- the two methods


def full_pull(work: Path, runc: Runc, link: Link) -> dict[str, Any]:
    """skopeo copy + umoci unpack + runc run; seconds per step and bytes on the wire."""
    layout, bundle = work / "full-layout", work / "full-bundle"
    shutil.rmtree(layout, ignore_errors=True)
    shutil.rmtree(bundle, ignore_errors=True)
    drop_caches()
    tx0 = link.tx_bytes()
    t0 = time.perf_counter()
    try:
        run([*netns_prefix(NODE_NS), "skopeo", "copy", "-q", "--src-tls-verify=false",
             f"docker://{REG_ADDR}/{OCI_REPO}", f"oci:{layout}:t"], timeout=STEP_TIMEOUT,
            what="skopeo copy (full pull)")
        t_pull = time.perf_counter()
        run(["umoci", "unpack", "--image", f"{layout}:t", str(bundle)], timeout=STEP_TIMEOUT,
            what="umoci unpack")
        t_unpack = time.perf_counter()
        cfg_path = bundle / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["process"]["terminal"] = False
        cfg_path.write_text(json.dumps(cfg))
        ready, _ = runc.run_until_ready(bundle, t0)
        wire = link.tx_bytes() - tx0
    finally:
        shutil.rmtree(layout, ignore_errors=True)
        shutil.rmtree(bundle, ignore_errors=True)
    return {"ready": ready, "pull": t_pull - t0, "unpack": t_unpack - t_pull,
            "run": ready - (t_unpack - t0), "wire_bytes": wire}


class MountService:
    """``nydusfs service`` in the node namespace, started once before the samples; ``stop()``
    sends SIGTERM by PID (SIGKILL if it hangs)."""

    def __init__(self, work: Path) -> None:
        self.sock = work / "service.sock"
        self.log = work / "service.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [*netns_prefix(NODE_NS), *NYDUSFS, "service", "--socket", str(self.sock)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        proc = self.proc
        _wait_until(lambda: self.sock.exists() or proc.poll() is not None,
                    "the mount service's socket")
        if proc.poll() is not None:
            raise BenchError(f"nydusfs service exited: {self.log.read_text()[-500:]}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, WAIT)


class NydusMount:
    """``nydusfs mount REF`` in the node namespace (daemon in the background; through the
    mount service at ``service`` if given, else ``--service never``), torn down by
    ``close()``: ``nydusfs umount``, then the daemon's PID waited for (SIGKILL if it hangs)."""

    def __init__(self, work: Path, service: Path | None = None) -> None:
        self.mnt = work / "nydus-mnt"
        self.pid: int | None = None
        self.service = service

    def mount(self, ref: str, config: Path) -> None:
        self.mnt.mkdir(parents=True, exist_ok=True)
        how = (["--service", "always", "--service-socket", str(self.service)]
               if self.service is not None else ["--service", "never"])
        out = run([*netns_prefix(NODE_NS), *NYDUSFS, "mount", ref, str(self.mnt), "--config",
                   str(config), "--background", *how], timeout=STEP_TIMEOUT,
                  what="nydusfs mount")
        m = re.search(r"daemon pid (\d+)", out)
        self.pid = int(m.group(1)) if m else None
        if not os.path.ismount(self.mnt):
            raise BenchError(f"nydusfs mount returned but {self.mnt} is not a mount point")

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(run([*NYDUSFS, "stat", str(self.mnt), "--json"],
                                              timeout=WAIT, what="nydusfs stat"))
        pid = data.get("pid")
        if self.pid is None and isinstance(pid, int):
            self.pid = pid
        return data

    def close(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run([*NYDUSFS, "umount", str(self.mnt)], capture_output=True,
                           timeout=WAIT, check=False)
        pid, self.pid = self.pid, None
        if pid is not None:
            try:
                _wait_until(lambda: not process_alive(pid), f"nydusfs daemon {pid} to exit")
            except BenchError:
                os.kill(pid, signal.SIGKILL)
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, timeout=WAIT,
                           check=False)


def traced_bytes(trace: Path, root: Path) -> tuple[int, int]:
    """(files, total size) of the paths in an access trace, stat'ed under ``root``."""
    files = total = 0
    try:
        paths = trace.read_bytes().splitlines()
    except OSError:
        return 0, 0
    for p in dict.fromkeys(paths):
        try:
            st = os.lstat(os.path.join(os.fsencode(root), p.lstrip(b"/")))
        except OSError:
            continue
        files += 1
        total += st.st_size
    return files, total


def nydus_start(work: Path, runc: Runc, link: Link, ref: str, image_config: dict[str, Any],
                template: dict[str, Any], ref_tree: Path, keep_trace: Path | None = None,
                service: Path | None = None) -> dict[str, Any]:
    """nydusfs mount REF + overlay + runc run; times, wire bytes, the mount's counters.

    The access trace is written when the mount goes away; the files in it are sized in
    ``ref_tree`` (the same image unpacked by umoci) and the trace kept in ``keep_trace``.
    ``service``: the mount service's socket, to mount through it.
    """
    run_dir = work / "nydus-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    trace = run_dir / "access.trace"
    config = run_dir / "mount.yaml"
    config.write_text(
        "backend:\n  type: registry\n  registry: {plain_http: true}\n"
        f"cache: {{enabled: true, dir: {run_dir / 'cache'}}}\n"
        f"access_trace: {trace}\n")
    mount = NydusMount(work, service)
    rw, merged, bundle = run_dir / "rw", run_dir / "merged", run_dir / "bundle"
    for d in (rw, merged, bundle):
        d.mkdir()
    drop_caches()
    tx0 = link.tx_bytes()
    t0 = time.perf_counter()
    wall0 = time.time()
    try:
        mount.mount(ref, config)
        t_mount = time.perf_counter()
        _mount("-t", "tmpfs", "-o", "size=256m", "tmpfs", str(rw))
        (rw / "upper").mkdir()
        (rw / "work").mkdir()
        _mount("-t", "overlay", "overlay", "-o",
               f"lowerdir={mount.mnt},upperdir={rw / 'upper'},workdir={rw / 'work'}",
               str(merged))
        (bundle / "config.json").write_text(
            json.dumps(bundle_config(image_config, template, merged)))
        t_runc = time.perf_counter()
        ready, _ = runc.run_until_ready(bundle, t0)
        wire = link.tx_bytes() - tx0
        status = mount.status()
    finally:
        _umount(merged)
        _umount(rw)
        mount.close()
    files, file_bytes = traced_bytes(trace, ref_tree)
    if keep_trace is not None:
        shutil.copyfile(trace, keep_trace)
    shutil.rmtree(run_dir, ignore_errors=True)
    rd = status.get("read", {})
    backend = status.get("backend_counters", {})
    # Seconds from t0: the daemon's own marks (wall clock), then ours.
    timeline = {k: v - wall0 for k, v in (status.get("timeline") or {}).items()}
    timeline.update({"mount_returned": t_mount - t0, "runc_start": t_runc - t0,
                     "ready_line": ready})
    return {"ready": ready, "mount": t_mount - t0, "run": ready - (t_mount - t0),
            "timeline": timeline,
            "wire_bytes": wire, "fetched_bytes": backend.get("bytes_read"),
            "backend_reads": backend.get("reads"),
            "fuse_bytes_read": rd.get("bytes_read"), "fuse_reads": rd.get("reads"),
            "chunks_fetched": rd.get("chunks_fetched"), "trace_files": files,
            "fetched_chunk_bytes": (status.get("cache") or {}).get("bytes_stored"),
            "trace_file_bytes": file_bytes, "cache": status.get("cache")}


# --------------------------------------------------------------------------- main


def mount_ref_available() -> bool:
    """``nydusfs mount`` takes an image reference (issue 4) and ``convert`` exists."""
    conv = subprocess.run([*NYDUSFS, "convert", "--help"], capture_output=True, text=True,
                          timeout=60, check=False)
    return conv.returncode == 0


def nydus_sizes(ref: str, netns: str | None = None) -> dict[str, int]:
    man = raw_manifest(ref, netns=netns)
    layers = man["layers"]
    assert isinstance(layers, list)
    return {**manifest_sizes(man), "bootstrap_bytes": int(layers[-1]["size"]),
            "blob_bytes": sum(int(x["size"]) for x in layers[:-1])}


def prepare_registry(image: OciImage, storage: Path, work: Path, with_nydus: bool
                     ) -> dict[str, Any]:
    """Push (and convert) on a loopback registry sharing ``storage`` with the shaped one;
    unpack the image to ``work/ref`` (the reference tree that sizes traced files)."""
    run(["umoci", "unpack", "--image", f"{image.layout}:{image.tag}", str(work / "ref")],
        timeout=STEP_TIMEOUT, what="umoci unpack (reference tree)")
    reg = Registry(work / "prep-registry", storage=storage)
    reg.start()
    try:
        push(image, f"{reg.host}/{OCI_REPO}")
        oci = raw_manifest(f"{reg.host}/{OCI_REPO}")
        info: dict[str, Any] = {"oci": manifest_sizes(oci)}
        cfg_digest = oci["config"]["digest"]  # type: ignore[index]
        blob = storage / "docker/registry/v2/blobs/sha256" / cfg_digest[7:9] / cfg_digest[7:]
        info["image_config"] = json.loads((blob / "data").read_text())
        if with_nydus:
            t0 = time.perf_counter()
            run([*NYDUSFS, "convert", *CONVERT_FLAGS, f"{reg.host}/{OCI_REPO}",
                 f"{reg.host}/{NYDUS_REPO}"], timeout=STEP_TIMEOUT, what="nydusfs convert")
            info["nydus"] = {**nydus_sizes(f"{reg.host}/{NYDUS_REPO}"),
                             "convert_seconds": time.perf_counter() - t0}
        return info
    finally:
        reg.stop()


def profile_and_convert(work: Path, runc: Runc, link: Link, prep: dict[str, Any],
                        template: dict[str, Any]) -> dict[str, Any]:
    """The prefetch variant, made as a user would: one start of the container from the lazy
    image (unshaped link, not measured) records the access trace; ``nydusfs convert --prefetch
    TRACE`` then writes those files' chunks first and lists them in the image, and the mount
    fetches them in the background from the start."""
    trace = work / "startup.trace"
    link.shape(None)
    nydus_start(work, runc, link, f"{REG_ADDR}/{NYDUS_REPO}", prep["image_config"], template,
                work / "ref" / "rootfs", keep_trace=trace)
    run([*netns_prefix(NODE_NS), *NYDUSFS, "convert", *CONVERT_FLAGS, "--plain-http",
         "--prefetch", str(trace), f"{REG_ADDR}/{OCI_REPO}", f"{REG_ADDR}/{PREFETCH_REPO}"],
        timeout=STEP_TIMEOUT, what="nydusfs convert --prefetch")
    n = len(dict.fromkeys(trace.read_bytes().splitlines()))
    return {**nydus_sizes(f"{REG_ADDR}/{PREFETCH_REPO}", netns=NODE_NS), "prefetch_files": n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="samples per method and rate (median)")
    ap.add_argument("--rates", default="24mbit,100mbit", help="tc tbf rates, comma-separated")
    ap.add_argument("--workdir", type=Path, default=CACHE_DIR / "coldstart")
    ap.add_argument("--skip-nydusfs", action="store_true",
                    help="measure the full pull only (nydusfs convert / mount REF pending)")
    ap.add_argument("--no-prefetch", action="store_true",
                    help="skip the variants converted with a prefetch list")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset of " + ", ".join(METHODS))
    args = ap.parse_args(argv)
    if not can_run("coldstart_bench",
                   ("runc", "umoci", "skopeo", "docker-registry", "tc", "nsenter")):
        return 1
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    for r in rates:
        mbit_to_bytes(r)
    with_nydus = not args.skip_nydusfs and mount_ref_available()
    if not with_nydus:
        print("coldstart_bench: `nydusfs convert` / `mount REF` not available: full pull only",
              file=sys.stderr)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown or "full" not in methods:
        raise SystemExit(f"coldstart_bench: --methods: need full, and only {', '.join(METHODS)}")
    if not with_nydus:
        methods = ["full"]
    if args.no_prefetch:
        methods = [m for m in methods if "prefetch" not in m]
    refs = {"nydusfs": f"{REG_ADDR}/{NYDUS_REPO}",
            "nydusfs-prefetch": f"{REG_ADDR}/{PREFETCH_REPO}"}
    for m in methods:
        refs.setdefault(m, refs.get(m.removesuffix("-service"), ""))
    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    storage = work / "registry-data"
    link = Link()
    runc = Runc(work / "runc-state")
    registry: Registry | None = None
    service = MountService(work)
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        r: {m: [] for m in methods} for r in rates}
    try:
        image = ensure_image()
        prep = prepare_registry(image, storage, work, with_nydus)
        template = _runc_template(work)
        link.up()
        registry = Registry(work / "registry", addr=REG_ADDR, netns=REG_NS, storage=storage)
        registry.start()
        if any("prefetch" in m for m in methods):
            prep["nydus_prefetch"] = profile_and_convert(work, runc, link, prep, template)
        if any(m.endswith("-service") for m in methods):
            service.start()  # once, not timed: a resident service, like nydusd's
        for rate in rates:
            link.shape(rate)
            for rnd in range(args.runs):
                order = methods[rnd % len(methods):] + methods[:rnd % len(methods)]
                for method in order:
                    if method == "full":
                        s = full_pull(work, runc, link)
                    else:
                        s = nydus_start(work, runc, link, refs[method], prep["image_config"],
                                        template, work / "ref" / "rootfs",
                                        service=(service.sock if method.endswith("-service")
                                                 else None))
                    s["loadavg"] = os.getloadavg()[0]  # the machine is shared: how busy
                    samples[rate][method].append(s)
                    extra = (f"pull {s['pull']:.1f} s, unpack {s['unpack']:.1f} s"
                             if method == "full" else
                             f"mount {s['mount']:.2f} s, fetched {s['fetched_bytes'] / 1e6:.1f} "
                             f"MB, FUSE read {s['fuse_bytes_read'] / 1e6:.1f} MB")
                    print(f"{rate} round {rnd + 1}/{args.runs} {method:16} ready in "
                          f"{s['ready']:6.2f} s; wire {s['wire_bytes'] / 1e6:.1f} MB; {extra}",
                          file=sys.stderr)
    except BenchError as exc:
        print(f"coldstart_bench: {exc}", file=sys.stderr)
        return 1
    finally:
        service.stop()
        if registry is not None:
            registry.stop()
        runc.close()
        link.down()

    medians: dict[str, dict[str, dict[str, Any]]] = {
        r: {m: {k: median([float(s[k]) for s in ss])
                for k in ss[0] if isinstance(ss[0][k], int | float)}
            for m, ss in by_m.items()} for r, by_m in samples.items()}
    for r, by_m in samples.items():  # the timeline's marks, each its own median
        for m, ss in by_m.items():
            marks = [s["timeline"] for s in ss if s.get("timeline")]
            if marks:
                medians[r][m]["timeline"] = {k: median([t[k] for t in marks if k in t])
                                             for k in marks[0]}
    result: dict[str, Any] = {
        "machine": machine_info(),
        "command": "make bench-coldstart   # .venv/bin/python bench/coldstart_bench.py "
                   f"--runs {args.runs}",
        "convert_flags": list(CONVERT_FLAGS),
        "runs": args.runs,
        "rates": {r: mbit_to_bytes(r) for r in rates},
        "methods": methods,
        "packages": " ".join(image.packages),
        "layers": list(image.layers),
        "image_cmd": prep["image_config"].get("config", {}).get("Cmd"),
        "app": "import json, email, http.client; print('ready')",
        "oci": prep["oci"],
        "nydus": prep.get("nydus"),
        "nydus_prefetch": prep.get("nydus_prefetch"),
        "drop_caches": drop_caches(),
        "samples": samples,
        "medians": medians,
        "versions": {
            "runc": tool_version(["runc", "--version"]),
            "skopeo": tool_version(["skopeo", "--version"]),
            "umoci": tool_version(["umoci", "--version"]),
        },
    }
    if with_nydus:
        result["ratios"] = {
            r: {m: {"ready": medians[r][m]["ready"] / medians[r]["full"]["ready"],
                    "fetched_vs_read": (medians[r][m]["fetched_bytes"]
                                        / medians[r][m]["fuse_bytes_read"])}
                for m in methods if m != "full"}
            for r in rates}
        for r, by_m in result["ratios"].items():
            for m, x in by_m.items():
                print(f"{r} {m}: ready time / full pull {x['ready']:.3f}; fetched / read "
                      f"{x['fetched_vs_read']:.2f}", file=sys.stderr)
    path = save_result("coldstart", result)
    print(f"raw results in {path.relative_to(REPO_DIR)}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _runc_template(work: Path) -> dict[str, Any]:
    d = work / "runc-template"
    d.mkdir(parents=True, exist_ok=True)
    run(["runc", "spec", "--bundle", str(d)], timeout=WAIT)
    template: dict[str, Any] = json.loads((d / "config.json").read_text())
    return template


if __name__ == "__main__":
    sys.exit(main())
