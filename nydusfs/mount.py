"""Mount lifecycle: open the image, build the backend, serve FUSE; background daemons; umount.

``mount_foreground`` serves until the mountpoint is unmounted or the process gets SIGTERM or
SIGINT, then unmounts cleanly. ``mount_background`` forks a detached daemon (a new session,
output to a log file) that runs the same ``mount_foreground``, and returns only once the
daemon says the mount is ready (through a pipe), or reports the daemon's error if it failed —
a caller never sees a half-ready mountpoint. A fork, not a new interpreter: a container start
waits for the mount, and a second Python start-up with its imports was most of that wait.

The image is a bootstrap file or, when the argument is not an existing path, an image
reference (``registry/repository:tag``). For a reference, the manifest and the bootstrap layer
are fetched and checked against each other (``oci.image``: layer digest, unpacked digest, root
digest, blob table), the bootstrap is kept as ``<cache.dir>/bootstraps/<sha256>`` (reused,
after re-hashing, by the next mount of the same image), and blobs are read lazily from the
same repository with the ``registry`` backend: host and repository from the reference, TLS
and credentials from the config's ``backend.registry`` block, overridden by command-line
flags (:class:`RemoteOptions`).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import asyncio

    from nydusfs.config import MountConfig, RegistryConfig
    from nydusfs.fs.model import ImageFS
    from nydusfs.fs.prefetch import Prefetcher
    from nydusfs.metrics import FsMetrics
    from nydusfs.oci.reference import Reference
    from nydusfs.storage.cache import DiskChunkStore
    from nydusfs.storage.dragonfly import DragonflyBackend

from nydusfs.errors import NydusfsError

__all__ = ["RemoteOptions", "detach", "exit_daemon", "fetch_remote_bootstrap", "mount_background",
           "mount_foreground", "process_start_time", "resolve_image_arg", "unmount"]

READY_TIMEOUT = 60.0
# The prefetch list is what the container reads as it starts: fetched at once, not behind
# its reads, in batches this small so chunks arrive in list order (fs/prefetch.py).
LIST_BATCH_BYTES = 256 << 10


@dataclass(frozen=True, slots=True)
class RemoteOptions:
    """Command-line registry settings for an image reference; set fields beat the config's
    ``backend.registry`` block (``None``/``False`` leave the config's value)."""

    platform: str = "linux/amd64"
    plain_http: bool | None = None
    insecure_skip_verify: bool = False
    ca_file: Path | None = None
    auth_file: Path | None = None
    username: str | None = None
    password: str | None = None

    def apply(self, cfg: RegistryConfig, ref: Reference) -> RegistryConfig:
        """``cfg`` for ``ref``'s repository with these options laid over it."""
        kw: dict[str, object] = {"host": ref.registry, "repository": ref.repository}
        if self.plain_http is not None:
            kw["plain_http"] = self.plain_http
        if self.insecure_skip_verify:
            kw["insecure_skip_verify"] = True
        for key in ("ca_file", "auth_file"):
            if getattr(self, key) is not None:
                kw[key] = getattr(self, key)
        if self.username is not None or self.password is not None:
            kw["username"], kw["password"] = self.username, self.password
        return replace(cfg, **kw)  # type: ignore[arg-type]


def resolve_image_arg(image: str | Path) -> Path | Reference:
    """A bootstrap path when ``image`` names an existing file, else an image reference.

    Something that looks like a path (``/...``, ``./...``, ``~...``) and does not exist is
    reported as a missing file, not tried as a reference on Docker Hub.
    """
    from nydusfs.errors import ConfigError
    from nydusfs.oci.reference import Reference

    text = os.fspath(image)
    if os.path.exists(text) or text.startswith(("/", ".", "~")):
        return Path(text)
    try:
        return Reference.parse(text)
    except ConfigError as exc:
        raise NydusfsError(f"{text}: no such bootstrap file, and not an image reference "
                           f"({str(exc).split(': ', 2)[-1]})") from exc


def fetch_remote_bootstrap(ref: Reference, registry: RegistryConfig, *, cache_dir: Path,
                           timeout: float, attempts: int, platform: str,
                           timeline: dict[str, float] | None = None) -> Path:
    """Fetch and check ``ref``'s bootstrap; return its path under ``cache_dir/bootstraps``.

    A bootstrap already there (named by the sha256 of its bytes) is re-hashed and reused, so
    a second mount of the same image costs one manifest request. ``timeline`` gets the times
    the manifest and the bootstrap were in hand (``time.time()``).
    """
    marks: dict[str, float] = timeline if timeline is not None else {}
    import asyncio
    import hashlib

    from nydusfs.format.reader import Bootstrap
    from nydusfs.oci.client import ClientOptions, RegistryClient
    from nydusfs.oci.image import check_bootstrap, open_bootstrap_layer, parse_image

    options = ClientOptions.from_registry_config(registry, timeout=timeout, attempts=attempts)
    where = str(ref)
    store = cache_dir / "bootstraps"

    async def run() -> Path:
        async with RegistryClient(ref.registry, options) as client:
            manifest = await client.get_manifest(ref.repository, ref.reference,
                                                 platform=platform)
            marks["manifest"] = time.time()
            image = parse_image(manifest, where)
            name = (image.bootstrap_digest or image.bootstrap.digest).split(":", 1)[1]
            path = store / name
            cached = await asyncio.to_thread(_read_if_intact, path, name)
            if cached:
                with Bootstrap.open(path) as boot:
                    check_bootstrap(image, boot, where)
                marks["bootstrap"] = time.time()
                return path
            layer = await client.get_blob(ref.repository, image.bootstrap.digest,
                                          max_size=max(image.bootstrap.size, 1))
        data = open_bootstrap_layer(image, layer, where)
        assert hashlib.sha256(data).hexdigest() == name
        await asyncio.to_thread(_write_atomic, path, data)
        marks["bootstrap"] = time.time()
        return path

    return asyncio.run(run())


def _read_if_intact(path: Path, sha256_hex: str) -> bool:
    import hashlib

    try:
        data = path.read_bytes()
    except OSError:
        return False
    return hashlib.sha256(data).hexdigest() == sha256_hex


def _write_atomic(path: Path, data: bytes) -> None:
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".bootstrap-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise NydusfsError(f"{path}: cannot store the image's bootstrap: {exc.strerror}") from exc


def _remote_config(config: MountConfig, ref: Reference, remote: RemoteOptions) -> MountConfig:
    """The config for mounting ``ref``: the registry backend on its repository, unless the
    config names another remote backend (``s3``, ``dragonfly``) or a ``localfs`` directory."""
    backend = config.backend
    registry = remote.apply(backend.registry, ref)
    keep_type = backend.type != "localfs" or backend.localfs.dir is not None
    backend = replace(backend, type=backend.type if keep_type else "registry",
                      registry=registry)
    return replace(config, backend=backend)


def mount_foreground(
    image: str | Path,
    mountpoint: Path,
    config_path: Path | None,
    ready_fd: int | None = None,
    log_file: Path | None = None,
    remote: RemoteOptions | None = None,
    *,
    started: float | None = None,
    on_ready: Callable[[], None] | None = None,
    marks: dict[str, float] | None = None,
) -> int:
    """Mount ``image`` at ``mountpoint`` and serve it until unmounted (see the module doc).

    ``ready_fd`` gets one byte, ``1``, once the mount is ready, and ``on_ready`` is called
    then (the mount service's children answer their client with it); ``log_file`` is removed
    at the end if it stayed empty; ``started`` is when the command began (default: this
    process's start), the origin of the status API's timeline, to which ``marks`` (times
    taken before this call, e.g. the service's ``request``) are added.
    """
    from nydusfs.config import load_config

    timeline: dict[str, float] = {
        "process_start": started if started is not None else process_start_time(),
        **(marks or {}), "mount_start": time.time()}
    config = load_config(config_path)
    if not mountpoint.is_dir():
        raise NydusfsError(f"{mountpoint}: mountpoint is not a directory")
    target = resolve_image_arg(image)
    if isinstance(target, Path):
        bootstrap, label = target, target.name
    else:
        remote = remote or RemoteOptions()
        config = _remote_config(config, target, remote)
        bootstrap = fetch_remote_bootstrap(
            target, config.backend.registry, cache_dir=config.cache.dir,
            timeout=config.backend.timeout, attempts=config.backend.attempts,
            platform=remote.platform, timeline=timeline)
        label = str(target)
    from nydusfs.format.reader import Bootstrap
    from nydusfs.fs.fuse import serve
    from nydusfs.fs.model import ImageFS
    from nydusfs.metrics import FsMetrics
    from nydusfs.storage import create_backend

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
                 readahead_chunks=config.read.readahead_chunks, access_trace=trace,
                 bootstrap_memory=config.read.bootstrap_memory)
    services = _Services(fs, config, label if not isinstance(target, Path) else bootstrap,
                         mountpoint, metrics, store, timeline)

    def ready() -> None:
        timeline["ready"] = time.time()
        if ready_fd is not None:
            os.write(ready_fd, b"1")
            os.close(ready_fd)
        if on_ready is not None:
            on_ready()

    try:
        serve(fs, str(mountpoint), allow_other=config.fuse.allow_other,
              fsname=f"nydusfs:{label}", entry_timeout=config.fuse.entry_timeout,
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

    def __init__(self, fs: ImageFS, config: MountConfig, bootstrap: Path | str,
                 mountpoint: Path, metrics: FsMetrics, store: DiskChunkStore | None,
                 timeline: dict[str, float]) -> None:
        self.fs = fs
        self.timeline = timeline
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
        timeline = dict(self.timeline)
        if self.fs.first_read_at is not None and self.fs.last_read_at is not None:
            timeline["first_read"] = self.fs.first_read_at
            timeline["last_read"] = self.fs.last_read_at
        out["timeline"] = timeline  # wall-clock times (seconds since the epoch)
        if self.prefetcher is not None:
            out["prefetch"] = self.prefetcher.snapshot()
        if self.store is not None:
            out["cache"] = self.store.stats()
        agent = self._dragonfly()
        if agent is not None:
            out["dragonfly"] = agent.stats()  # agent chunks, fallbacks to the source
        return out

    def _dragonfly(self) -> DragonflyBackend | None:
        """The dragonfly backend under the wrapper stack, if that is this mount's backend."""
        if self.config.backend.type != "dragonfly":  # do not import aiohttp for nothing
            return None
        from nydusfs.storage.dragonfly import DragonflyBackend

        inner: object = self.fs.backend
        while hasattr(inner, "inner"):  # through the wrapper stack to the backend itself
            inner = inner.inner
        return inner if isinstance(inner, DragonflyBackend) else None

    async def start(self) -> Callable[[], Awaitable[None]]:
        import asyncio

        from nydusfs.fs.api import api_socket_path, start_api
        from nydusfs.fs.prefetch import Prefetcher
        from nydusfs.metrics import (
            cache_gauges,
            dragonfly_gauges,
            prefetch_gauges,
            start_metrics_server,
        )

        cfg = self.config
        tasks: list[asyncio.Task[None]] = []
        if self.fs.boot.header.count("prefetch") or cfg.prefetch.all:
            self.prefetcher = Prefetcher(self.fs, all=cfg.prefetch.all,
                                         bandwidth=cfg.prefetch.bandwidth,
                                         concurrency=cfg.prefetch.concurrency,
                                         list_batch_bytes=LIST_BATCH_BYTES, list_priority=True)
            prefetcher = self.prefetcher
            self.metrics.add_gauge_source(lambda: prefetch_gauges(prefetcher.snapshot()))
            tasks.append(asyncio.get_running_loop().create_task(prefetcher.run()))
        if self.store is not None:
            store, quota = self.store, cfg.cache.quota
            self.metrics.add_gauge_source(lambda: cache_gauges(store.stats(), quota))
        agent = self._dragonfly()
        if agent is not None:
            self.metrics.add_gauge_source(lambda: dragonfly_gauges(agent.stats()))
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


def mount_background(image: str | Path, mountpoint: Path, config_path: Path | None,
                     remote: RemoteOptions | None = None) -> int:
    """Fork a daemon serving the mount; return 0 once it is ready (its PID is printed).

    The child starts a new session, takes ``/dev/null`` as stdin and a log file as stdout and
    stderr, and runs :func:`mount_foreground` with the write end of a pipe as its ready fd; an
    error there ends the child with the message in the log, which this reads and raises. Only
    this thread may run at the fork (the CLI has started no other and no event loop).
    """
    import tempfile

    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (handed to the child, kept on success)
        prefix="nydusfs-mount-", suffix=".log", delete=False)
    started = process_start_time()  # the command's start: what a caller waited for
    r, w = os.pipe()
    for stream in (sys.stdout, sys.stderr):  # None when the caller closed it
        if stream is not None:
            stream.flush()
    pid = os.fork()
    if pid == 0:  # the daemon: never returns
        os.close(r)
        _daemon(image, mountpoint, config_path, remote, w, log.fileno(), Path(log.name),
                started)
    os.close(w)
    log.close()
    try:
        ok = _wait_ready(r, pid)
    finally:
        os.close(r)
    if not ok:
        detail = Path(log.name).read_text(errors="replace").strip().splitlines()
        os.unlink(log.name)
        last = detail[-1].removeprefix("nydusfs: error: ") if detail else ""
        raise NydusfsError(last or "mount daemon exited before the mount was ready")
    print(f"mounted {image} at {mountpoint} (daemon pid {pid}, log {log.name})")
    return 0


def _wait_ready(r: int, pid: int) -> bool:
    """Whether the daemon ``pid`` wrote its ready byte to ``r`` in time; a daemon that exits
    first is reaped, one that is not ready within ``READY_TIMEOUT`` killed and reaped."""
    import select

    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise NydusfsError(f"mount daemon not ready after {READY_TIMEOUT:.0f} s")
        readable, _, _ = select.select([r], [], [], min(left, 0.5))
        if readable:
            if os.read(r, 1) == b"1":
                return True
            os.waitpid(pid, 0)  # EOF: the daemon closed the pipe without saying ready
            return False
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False


def _daemon(image: str | Path, mountpoint: Path, config_path: Path | None,
            remote: RemoteOptions | None, ready_fd: int, log_fd: int, log_file: Path,
            started: float) -> NoReturn:
    """The forked child: detach, serve the mount, exit (``os._exit``: the parent's
    ``atexit`` handlers and buffers are the parent's)."""
    status = 1
    try:
        ready_fd = detach(ready_fd, log_fd)
        status = mount_foreground(image, mountpoint, config_path, ready_fd, log_file, remote,
                                  started=started)
    except (NydusfsError, OSError) as exc:
        print(f"nydusfs: error: {exc}", file=sys.stderr)
    except BaseException:  # a bug: its traceback in the log, never in the caller's terminal
        import traceback

        traceback.print_exc()
    finally:
        exit_daemon(status)


def exit_daemon(status: int) -> NoReturn:
    """End a forked daemon: flush its log, then ``os._exit`` (the parent's ``atexit``
    handlers and buffers are the parent's, not the child's)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


def detach(keep_fd: int, log_fd: int) -> int:
    """Make this (forked) process a daemon: a new session, ``/dev/null`` as stdin, ``log_fd``
    as stdout and stderr, every other descriptor but ``keep_fd`` closed; ``keep_fd``'s number
    afterwards (moved above 2 if it was below)."""
    os.setsid()
    # A caller that closed its stdin or stdout gave the pipe or the log a number below 3:
    # move them out of the way of the dup2s below.
    keep_fd, log_fd = (_fd_above_2(fd) for fd in (keep_fd, log_fd))
    devnull = os.open(os.devnull, os.O_RDONLY)
    if devnull != 0:  # 0 when the caller had closed its stdin
        os.dup2(devnull, 0)
        os.close(devnull)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    # Nothing else of the caller's (pipes it passed down, say) stays open in a daemon that
    # outlives it: as a fresh process started with close_fds would have it.
    os.closerange(3, keep_fd)
    os.closerange(keep_fd + 1, os.sysconf("SC_OPEN_MAX"))
    return keep_fd


def _fd_above_2(fd: int) -> int:
    if fd > 2:
        return fd
    import fcntl

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 3)
    os.close(fd)
    return moved


def process_start_time() -> float:
    """When this process started, as ``time.time()`` would have said (about 10 ms
    resolution: ``/proc/self/stat`` counts clock ticks since boot); now if unknown."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime; fields[0] is field 3
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        return time.time() - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, IndexError, ValueError):
        return time.time()


def unmount(mountpoint: Path) -> None:
    """Unmount; the daemon serving it sees the unmount and exits."""
    import shutil
    import subprocess

    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", str(mountpoint)] if tool else ["umount", str(mountpoint)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NydusfsError(f"{mountpoint}: cannot unmount: {proc.stderr.strip()}")
