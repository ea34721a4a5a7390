"""The mount daemon's status API: a small aiohttp app on a Unix socket (like nydusd's API).

This is the daemon side of ``nydusfs stat MOUNTPOINT`` (the client is :mod:`nydusfs.status`,
which finds the socket with :func:`api_socket_path`). Routes:

* ``GET /api/v1/status`` → JSON of whatever ``status_fn`` returns (image, mountpoint, pid,
  backend, read counters, prefetch snapshot, cache stats, ...).
* ``GET /healthz`` → ``ok``.

Handlers stay thin and never block the event loop: ``status_fn`` is called on the loop (the
filesystem's state is not thread safe), so it must only copy in-memory counters — no disk
scans, no network. The socket is mode 0600 under a 0700 directory: status is for root.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from nydusfs.errors import NydusfsError

__all__ = [
    "RUN_DIR",
    "ApiServer",
    "StatusFn",
    "api_socket_path",
    "make_app",
    "start_api",
]

log = logging.getLogger(__name__)

RUN_DIR = Path("/run/nydusfs")

StatusFn = Callable[[], dict[str, object]]

STATUS_FN: web.AppKey[StatusFn] = web.AppKey("status_fn")
SOCKET_PATH: web.AppKey[Path] = web.AppKey("socket_path")


def api_socket_path(mountpoint: Path, *, run_dir: Path = RUN_DIR, create: bool = True) -> Path:
    """``RUN_DIR/<16 hex of sha256(absolute mountpoint)>.sock``; creates ``run_dir`` (0700).

    Symlinks in the mountpoint's *parent* are resolved, the mountpoint itself is not touched
    (a stat of a hung FUSE root would block), so daemon and client agree on the name.
    """
    absolute = Path(os.path.abspath(mountpoint))
    canonical = Path(os.path.realpath(absolute.parent)) / absolute.name
    digest = hashlib.sha256(os.fsencode(canonical)).hexdigest()[:16]
    if create:
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return run_dir / f"{digest}.sock"


async def _status(request: web.Request) -> web.Response:
    body = request.app[STATUS_FN]()
    # default=str: Paths and similar objects in the status read as their string form.
    return web.json_response(body, dumps=lambda o: json.dumps(o, default=str))


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def make_app(status_fn: StatusFn) -> web.Application:
    app = web.Application()
    app[STATUS_FN] = status_fn
    app.router.add_get("/api/v1/status", _status)
    app.router.add_get("/healthz", _healthz)
    return app


async def _socket_file_ctx(app: web.Application) -> AsyncIterator[None]:
    """Own the socket file: clear a stale one before binding, remove ours on cleanup."""
    path = app[SOCKET_PATH]
    await _remove_stale_socket(path)
    yield
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def _remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise NydusfsError(f"{path}: exists and is not a socket; refusing to replace it")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2.0)
    except (OSError, TimeoutError):
        path.unlink(missing_ok=True)  # nobody listens: left over from a crashed daemon
        return
    writer.close()
    raise NydusfsError(f"{path}: another nydusfs daemon is serving this mountpoint")


class ApiServer:
    """A running status API; :meth:`close` stops it and removes the socket file."""

    def __init__(self, runner: web.AppRunner, path: Path) -> None:
        self.runner = runner
        self.path = path

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_api(path: Path, status_fn: StatusFn) -> ApiServer:
    app = make_app(status_fn)
    app[SOCKET_PATH] = path
    app.cleanup_ctx.append(_socket_file_ctx)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        # No umask dance (it is process-wide and would race other threads' file creation):
        # the 0700 run dir already keeps others out between bind and chmod.
        site = web.UnixSite(runner, str(path))
        await site.start()
        path.chmod(0o600)
    except BaseException:
        await runner.cleanup()
        raise
    log.debug("status API listening on %s", path)
    return ApiServer(runner, path)
