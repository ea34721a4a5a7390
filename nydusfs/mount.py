"""Mount lifecycle: open the image, build the backend, serve FUSE; background daemons; umount.

``mount_foreground`` serves until the mountpoint is unmounted or the process gets SIGTERM or
SIGINT, then unmounts cleanly. ``mount_background`` starts that same command as a detached
daemon and returns only once the daemon says the mount is ready (through an inherited pipe),
or reports the daemon's error if it failed — a caller never sees a half-ready mountpoint.
"""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nydusfs.config import MountConfig
    from nydusfs.fs.model import ImageFS
    from nydusfs.fs.prefetch import Prefetcher
    from nydusfs.metrics import FsMetrics
    from nydusfs.storage.cache import DiskChunkStore

from nydusfs.errors import NydusfsError

__all__ = ["mount_background", "mount_foreground", "unmount"]

READY_TIMEOUT = 60.0


def mount_foreground(
    bootstrap: Path,
    mountpoint: Path,
    config_path: Path | None,
    ready_fd: int | None = None,
    log_file: Path | None = None,
) -> int:
    from nydusfs.config import load_config
    from nydusfs.format.reader import Bootstrap
    from nydusfs.fs.fuse import serve
    from nydusfs.fs.model import ImageFS
    from nydusfs.metrics import FsMetrics
    from nydusfs.storage import create_backend

    config = load_config(config_path)
    if not mountpoint.is_dir():
        raise NydusfsError(f"{mountpoint}: mountpoint is not a directory")
    boot = Bootstrap.open(bootstrap)
    backend = create_backend(config.backend, image_dir=bootstrap.resolve().parent)
    store = None
    if config.cache_enabled:
        from nydusfs.storage.cache import DiskChunkStore

        store = DiskChunkStore(config.cache.dir, config.cache.quota)
    trace = None
    if config.access_trace is not None:
        try:
            trace = open(config.access_trace, "ab")  # noqa: SIM115 (closed on unmount)
        except OSError as exc:
            raise NydusfsError(f"access_trace: {config.access_trace}: {exc.strerror}") from exc
    metrics = FsMetrics(backends=[config.backend.type])
    fs = ImageFS(boot, backend, cache_bytes=config.read.cache_chunks,
                 merge_window=config.read.merge_window, store=store, observer=metrics,
                 readahead_chunks=config.read.readahead_chunks, access_trace=trace)
    services = _Services(fs, config, bootstrap, mountpoint, metrics, store)

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"1")
            os.close(ready_fd)

    try:
        serve(fs, str(mountpoint), allow_other=config.fuse.allow_other,
              fsname=f"nydusfs:{bootstrap.name}", entry_timeout=config.fuse.entry_timeout,
              attr_timeout=config.fuse.attr_timeout, on_ready=ready, services=services.start)
    except RuntimeError as exc:  # pyfuse3.init: mount(2) failed
        raise NydusfsError(f"{mountpoint}: cannot mount: {exc}") from exc
    finally:
        fs.flush_trace()
        if trace is not None:
            trace.close()
        boot.close()
    # A daemon's log that stayed empty says nothing: do not leave it behind.
    if log_file is not None and log_file.exists() and log_file.stat().st_size == 0:
        log_file.unlink()
    return 0


class _Services:
    """What runs beside a mount on its event loop: prefetch, the status API, metrics."""

    def __init__(self, fs: ImageFS, config: MountConfig, bootstrap: Path, mountpoint: Path,
                 metrics: FsMetrics, store: DiskChunkStore | None) -> None:
        self.fs = fs
        self.config = config
        self.bootstrap = bootstrap
        self.mountpoint = mountpoint
        self.metrics = metrics
        self.store = store
        self.prefetcher: Prefetcher | None = None
        self.started = time.time()

    def status(self) -> dict[str, object]:
        """Called on the event loop by the API: copies counters only."""
        from dataclasses import asdict

        backend = self.fs.backend
        out: dict[str, object] = {
            "image": str(self.bootstrap), "mountpoint": str(self.mountpoint), "pid": os.getpid(),
            "backend": self.config.backend.type,
            "uptime_seconds": round(time.time() - self.started),
            "read": asdict(self.fs.stats),
            "backend_counters": {"reads": getattr(backend, "reads", None),
                                 "bytes_read": getattr(backend, "bytes_read", None)},
        }
        if self.prefetcher is not None:
            out["prefetch"] = self.prefetcher.snapshot()
        if self.store is not None:
            out["cache"] = self.store.stats()
        return out

    async def start(self) -> Callable[[], Awaitable[None]]:
        from nydusfs.fs.api import api_socket_path, start_api
        from nydusfs.fs.prefetch import Prefetcher
        from nydusfs.metrics import cache_gauges, prefetch_gauges, start_metrics_server

        cfg = self.config
        tasks: list[asyncio.Task[None]] = []
        if self.fs.boot.header.count("prefetch") or cfg.prefetch.all:
            self.prefetcher = Prefetcher(self.fs, all=cfg.prefetch.all,
                                         bandwidth=cfg.prefetch.bandwidth,
                                         concurrency=cfg.prefetch.concurrency)
            prefetcher = self.prefetcher
            self.metrics.add_gauge_source(lambda: prefetch_gauges(prefetcher.snapshot()))
            tasks.append(asyncio.get_running_loop().create_task(prefetcher.run()))
        if self.store is not None:
            store, quota = self.store, cfg.cache.quota
            self.metrics.add_gauge_source(lambda: cache_gauges(store.stats(), quota))
        server = None
        if cfg.metrics is not None:
            server = await asyncio.to_thread(start_metrics_server, self.metrics,
                                             cfg.metrics.host, cfg.metrics.port)
        try:
            api = await start_api(api_socket_path(self.mountpoint), self.status)
        except (OSError, NydusfsError) as exc:  # status is a convenience, the mount is the job
            print(f"nydusfs: warning: status API unavailable: {exc}", file=sys.stderr)
            api = None

        async def stop() -> None:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if api is not None:
                await api.close()
            if server is not None:
                server.close()

        return stop


def mount_background(bootstrap: Path, mountpoint: Path, config_path: Path | None) -> int:
    """Start a daemon serving the mount; return 0 once it is ready (its PID is printed)."""
    r, w = os.pipe()
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (handed to the child, kept on success)
        prefix="nydusfs-mount-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "nydusfs.cli", "mount", str(bootstrap), str(mountpoint),
           "--ready-fd", str(w), "--log-file", log.name]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    try:
        child = subprocess.Popen(cmd, pass_fds=(w,), stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=log, start_new_session=True)
    finally:
        os.close(w)
        log.close()
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                child.kill()
                raise NydusfsError(f"mount daemon not ready after {READY_TIMEOUT:.0f} s")
            readable, _, _ = select.select([r], [], [], min(left, 0.5))
            if readable:
                ok = os.read(r, 1) == b"1"
                break
            if child.poll() is not None:
                ok = False
                break
    finally:
        os.close(r)
    if not ok:
        child.wait(timeout=10)
        detail = Path(log.name).read_text(errors="replace").strip().splitlines()
        os.unlink(log.name)
        last = detail[-1].removeprefix("nydusfs: error: ") if detail else ""
        raise NydusfsError(last or f"mount daemon exited with status {child.returncode}")
    print(f"mounted {bootstrap} at {mountpoint} (daemon pid {child.pid}, log {log.name})")
    return 0


def unmount(mountpoint: Path) -> None:
    """Unmount; the daemon serving it sees the unmount and exits."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", str(mountpoint)] if tool else ["umount", str(mountpoint)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NydusfsError(f"{mountpoint}: cannot unmount: {proc.stderr.strip()}")
