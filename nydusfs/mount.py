"""Mount lifecycle: open the image, build the backend, serve FUSE; background daemons; umount.

``mount_foreground`` serves until the mountpoint is unmounted or the process gets SIGTERM or
SIGINT, then unmounts cleanly. ``mount_background`` starts that same command as a detached
daemon and returns only once the daemon says the mount is ready (through an inherited pipe),
or reports the daemon's error if it failed — a caller never sees a half-ready mountpoint.

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

import asyncio
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nydusfs.config import MountConfig, RegistryConfig
    from nydusfs.fs.model import ImageFS
    from nydusfs.fs.prefetch import Prefetcher
    from nydusfs.metrics import FsMetrics
    from nydusfs.oci.reference import Reference
    from nydusfs.storage.cache import DiskChunkStore

from nydusfs.errors import NydusfsError

__all__ = ["RemoteOptions", "fetch_remote_bootstrap", "mount_background", "mount_foreground",
           "resolve_image_arg", "unmount"]

READY_TIMEOUT = 60.0


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

    def argv(self) -> list[str]:
        """The flags reproducing these options (without the password)."""
        out = ["--platform", self.platform]
        if self.plain_http:
            out.append("--plain-http")
        if self.insecure_skip_verify:
            out.append("--insecure-skip-verify")
        if self.ca_file is not None:
            out += ["--ca-file", str(self.ca_file)]
        if self.auth_file is not None:
            out += ["--auth-file", str(self.auth_file)]
        if self.username is not None:
            out += ["--username", self.username]
        return out

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
                           timeout: float, attempts: int, platform: str) -> Path:
    """Fetch and check ``ref``'s bootstrap; return its path under ``cache_dir/bootstraps``.

    A bootstrap already there (named by the sha256 of its bytes) is re-hashed and reused, so
    a second mount of the same image costs one manifest request.
    """
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
            image = parse_image(manifest, where)
            name = (image.bootstrap_digest or image.bootstrap.digest).split(":", 1)[1]
            path = store / name
            cached = await asyncio.to_thread(_read_if_intact, path, name)
            if cached:
                with Bootstrap.open(path) as boot:
                    check_bootstrap(image, boot, where)
                return path
            layer = await client.get_blob(ref.repository, image.bootstrap.digest,
                                          max_size=max(image.bootstrap.size, 1))
        data = open_bootstrap_layer(image, layer, where)
        assert hashlib.sha256(data).hexdigest() == name
        await asyncio.to_thread(_write_atomic, path, data)
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
    target = resolve_image_arg(image)
    if isinstance(target, Path):
        bootstrap, label = target, target.name
    else:
        remote = remote or RemoteOptions()
        config = _remote_config(config, target, remote)
        bootstrap = fetch_remote_bootstrap(
            target, config.backend.registry, cache_dir=config.cache.dir,
            timeout=config.backend.timeout, attempts=config.backend.attempts,
            platform=remote.platform)
        label = str(target)
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
    services = _Services(fs, config, label if not isinstance(target, Path) else bootstrap,
                         mountpoint, metrics, store)

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"1")
            os.close(ready_fd)

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
                 mountpoint: Path,
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
        inner = backend
        while hasattr(inner, "inner"):  # through the wrapper stack to the backend itself
            inner = inner.inner
        if self.config.backend.type == "dragonfly" and hasattr(inner, "stats"):
            out["dragonfly"] = inner.stats()  # agent chunks, fallbacks to the source
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


def mount_background(image: str | Path, mountpoint: Path, config_path: Path | None,
                     remote: RemoteOptions | None = None) -> int:
    """Start a daemon serving the mount; return 0 once it is ready (its PID is printed)."""
    r, w = os.pipe()
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (handed to the child, kept on success)
        prefix="nydusfs-mount-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "nydusfs.cli", "mount", str(image), str(mountpoint),
           "--ready-fd", str(w), "--log-file", log.name]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    fds = [w]
    if remote is not None:
        cmd += remote.argv()
        if remote.password is not None:
            # Through a pipe the daemon reads once: never in its argv or environment.
            pr, pw = os.pipe()
            os.write(pw, remote.password.encode())  # far below the pipe's buffer
            os.close(pw)
            fds.append(pr)
            cmd += ["--password-fd", str(pr)]
    try:
        child = subprocess.Popen(cmd, pass_fds=fds, stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=log, start_new_session=True)
    finally:
        for fd in fds:
            os.close(fd)
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
    print(f"mounted {image} at {mountpoint} (daemon pid {child.pid}, log {log.name})")
    return 0


def unmount(mountpoint: Path) -> None:
    """Unmount; the daemon serving it sees the unmount and exits."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", str(mountpoint)] if tool else ["umount", str(mountpoint)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NydusfsError(f"{mountpoint}: cannot unmount: {proc.stderr.strip()}")
