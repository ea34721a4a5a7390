"""pyfuse3 adapter: a protocol translation over ``ImageFS``, nothing more.

The only module that imports pyfuse3. It converts ``Attr`` to ``EntryAttributes`` (with long
timeouts: the image is immutable, so the kernel may cache entries and attributes, and
``keep_cache`` lets the page cache serve re-reads), and ``FsError`` to ``FUSEError``. Every
write-ish operation is refused with EROFS: the mount is ``ro``, so the kernel answers them
before they reach us, and ``open`` for writing is refused here too.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import pyfuse3.asyncio

from nydusfs.fs.model import Attr, FsError, ImageFS

__all__ = ["FuseAdapter", "serve"]

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT


class FuseAdapter(pyfuse3.Operations):
    enable_writeback_cache = False
    supports_dot_lookup = True

    def __init__(self, fs: ImageFS, *, entry_timeout: float = 3600.0,
                 attr_timeout: float = 3600.0, dir_cache_entries: int = 1 << 18) -> None:
        super().__init__()
        self.fs = fs
        self._entry_timeout = entry_timeout
        self._attr_timeout = attr_timeout
        # The kernel does not cache directory listings of a FUSE filesystem (pyfuse3 cannot
        # ask it to), so `find` re-reads every directory each time. The image is immutable:
        # keep ready-made replies for recently listed directories, bounded in entries.
        self._dirs: OrderedDict[int, list[tuple[bytes, pyfuse3.EntryAttributes]]] = OrderedDict()
        self._dir_entries = 0
        self._dir_limit = dir_cache_entries

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        e.entry_timeout = self._entry_timeout
        e.attr_timeout = self._attr_timeout
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = 4096
        e.st_blocks = a.blocks
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = a.mtime_ns
        return e

    @staticmethod
    def _call(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from exc

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        return self._entry(self._call(lambda: self.fs.lookup(parent_inode, name)))

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._entry(self._call(lambda: self.fs.getattr(inode)))

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        result: bytes = self._call(lambda: self.fs.readlink(inode))
        return result

    async def opendir(self, inode: int, ctx: Any) -> int:
        self._call(lambda: self.fs.readdir(inode))  # ENOTDIR/ENOENT now, not at readdir
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = self._listing(fh)
        for i in range(max(start_id, 0), len(entries)):
            name, attrs = entries[i]
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                break

    def _listing(self, ino: int) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        entries = self._dirs.get(ino)
        if entries is not None:
            self._dirs.move_to_end(ino)
            return entries
        try:
            entries = [(name, self._entry(attr)) for name, attr, _ in self.fs.readdir(ino)]
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from exc
        if len(entries) <= self._dir_limit:
            self._dirs[ino] = entries
            self._dir_entries += len(entries)
            while self._dir_entries > self._dir_limit:
                _, old = self._dirs.popitem(last=False)
                self._dir_entries -= len(old)
        return entries

    async def releasedir(self, fh: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        self._call(lambda: self.fs.check_open(inode, bool(flags & _WRITE_FLAGS)))
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return await self.fs.read(fh, off, size)
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from exc

    async def release(self, fh: int) -> None:
        return None

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        result: bytes = self._call(lambda: self.fs.getxattr(inode, name))
        return result

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        result: list[bytes] = self._call(lambda: self.fs.listxattr(inode))
        return result

    async def statfs(self, ctx: Any) -> Any:
        info = self.fs.statfs()
        s = pyfuse3.StatvfsData()
        for key in ("bsize", "frsize", "blocks", "bfree", "bavail", "files", "ffree", "favail",
                    "namemax"):
            setattr(s, "f_" + key, info[key])
        return s


def serve(
    fs: ImageFS,
    mountpoint: str,
    *,
    allow_other: bool = True,
    fsname: str = "nydusfs",
    entry_timeout: float = 3600.0,
    attr_timeout: float = 3600.0,
    on_ready: Callable[[], None] | None = None,
    services: Callable[[], Awaitable[Callable[[], Awaitable[None]]]] | None = None,
) -> None:
    """Mount, serve until unmounted or SIGTERM/SIGINT, then unmount cleanly.

    ``services`` starts what runs beside the mount on the same event loop (prefetch, status
    API, metrics) once the mount is up, and returns the coroutine function that stops them.
    """
    pyfuse3.asyncio.enable()
    options = set(pyfuse3.default_options)
    options |= {f"fsname={fsname}", "ro", "default_permissions", "subtype=nydusfs"}
    if allow_other:
        options.add("allow_other")
    adapter = FuseAdapter(fs, entry_timeout=entry_timeout, attr_timeout=attr_timeout)

    started = False

    async def main() -> None:
        nonlocal started
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, pyfuse3.terminate)
        pyfuse3.init(adapter, mountpoint, options)
        started = True  # from here on, unmount on the way out whatever happens
        stop = await services() if services is not None else None
        if on_ready is not None:
            on_ready()
        try:
            await pyfuse3.main()
        finally:
            if stop is not None:
                await stop()
            await fs.backend.close()  # only once FUSE no longer calls into it

    try:
        asyncio.run(main())
    finally:
        if started:
            pyfuse3.close(unmount=True)
