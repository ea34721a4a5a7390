"""pyfuse3 adapter: a protocol translation over ``ImageFS``, nothing more.

The only module that imports pyfuse3. It converts ``Attr`` to ``EntryAttributes`` (with long
timeouts: the image is immutable, so the kernel may cache entries and attributes, and
``keep_cache`` lets the page cache serve re-reads), and ``FsError`` to ``FUSEError``. Every
write-ish operation is refused with EROFS: the mount is ``ro``, so the kernel answers them
before they reach us, and ``open`` for writing is refused here too.

Directory listings. pyfuse3 answers every READDIR as READDIRPLUS: each entry carries its
attributes and the kernel instantiates a dentry and an inode for it. That is what ``ls -l``
wants (no LOOKUP per entry afterwards) and what ``find`` does not (it needs only names and
``d_type``, yet pays for decoding every child inode here and instantiating it in the kernel:
most of a cold ``find``). The kernel's own answer, READDIRPLUS_AUTO, is switched off by pyfuse3,
so ``_ListingPolicy`` plays its part: listings send attributes for directories always and for
other entries only while readers are seen to look up what they list. An entry without
attributes is a READDIRPLUS entry whose node id is 0, which the kernel lists and otherwise
ignores (``fs/fuse/readdir.c``: "zero nodeid ... only means the userspace filesystem did not
want to return attributes/handle for this entry"); pyfuse3 has no call for it, see
``_name_only_template``.

Extended attributes. The kernel caches no xattr answer of a FUSE filesystem, and ``ls -l``
asks every file for two (``security.selinux``, ``system.posix_acl_access``), so a listing of
100k files costs 200k round trips to the daemon, each answered ENODATA. An image with no
extended attribute at all answers GETXATTR and LISTXATTR with ENOSYS instead: the kernel then
records that this filesystem has no xattr support (``fc->no_getxattr``/``no_listxattr``), never
asks again, and reports EOPNOTSUPP itself (``system.posix_acl_*``: "no ACL", ENODATA, on 6.x
kernels), as for a filesystem without xattrs (vfat); readers take that as "no xattrs"
(coreutils, which then stops asking for SELinux labels on that filesystem, overlayfs copy-up,
runc, tar, Python's ``shutil.copystat``). Measured on ``ls -lR`` of 100k files: 11 s -> 1.7 s.
Images with any xattr answer per file, as before: its names, ENODATA for others.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import signal
import stat
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pyfuse3
import pyfuse3.asyncio

from nydusfs.eventloop import new_event_loop
from nydusfs.format.records import Listing
from nydusfs.fs.model import Attr, FsError, ImageFS

__all__ = ["FuseAdapter", "serve"]

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT
_S_IFMT = 0o170000
_S_IFDIR = stat.S_IFDIR


def _name_only_template() -> tuple[pyfuse3.EntryAttributes, ctypes.c_uint64] | None:
    """An ``EntryAttributes`` whose node id stays 0, and a handle on its ``st_ino``.

    ``readdir_reply`` copies libfuse's ``fuse_entry_param`` that ``EntryAttributes`` holds inline
    (the node id first, then the generation, then ``struct stat``) with
    ``fuse_add_direntry_plus``, which takes the entry's ``d_ino`` from ``attr.st_ino`` and the
    kernel's node id from ``ino``. pyfuse3's ``st_ino`` setter always sets both, so an entry
    with a real ``d_ino`` and no attributes needs ``attr.st_ino`` written directly. The layout
    is checked here, on a throwaway object, with a sentinel written through the public setter
    and read back at both offsets, then the node id cleared and read back through the public
    getter; anything unexpected (another pyfuse3 or Python build) returns None, and every
    entry then carries attributes, as it always may.
    """
    if sys.implementation.name != "cpython" or pyfuse3.EntryAttributes.__basicsize__ < 48:
        return None
    sentinel = 0x5EED_1234_ABCD_9876
    e = pyfuse3.EntryAttributes()
    e.st_ino = sentinel
    param_ino = ctypes.c_uint64.from_address(id(e) + 16)  # after the object header
    attr_ino = ctypes.c_uint64.from_address(id(e) + 40)  # + ino, generation, st_dev
    if param_ino.value != sentinel or attr_ino.value != sentinel:
        return None
    param_ino.value = 0
    if e.st_ino != 0 or attr_ino.value != sentinel:
        return None
    attr_ino.value = 0
    return e, attr_ino


class _ListingPolicy:
    """Whether a listing sends every entry's attributes, or names only for non-directories.

    The signal: LOOKUPs of names from a listing sent without attributes (the kernel asks only
    for what it has not cached). If at least a quarter of such a listing's names were looked
    up before the next listing starts, readers stat what they list (``ls -l``, ``du``, tar):
    send attributes. Otherwise (``find``, ``os.walk``) send names. While attributes are sent
    no LOOKUP tells whether they are used, so every ``PROBE_EVERY``-th listing is sent without
    them to find out. Directory entries always carry attributes: walkers stat directories.
    Starts with names: a wrong guess costs a LOOKUP round trip per entry of one listing.
    """

    PROBE_EVERY = 32

    def __init__(self) -> None:
        self.plus = False
        self._watched: int | None = None  # directory of the last listing sent without attrs
        self._names = 0  # its entries sent without attributes
        self._looked_up = 0  # of those, looked up since
        self._listings = 0

    def start_listing(self, directory: int, names: int) -> bool:
        """A listing of ``directory`` begins, with ``names`` non-directory entries; send
        attributes for them?"""
        if self._watched is not None:
            self.plus = self._looked_up * 4 >= self._names
            self._watched = None
        if names == 0:
            return self.plus
        self._listings += 1
        if self.plus and self._listings % self.PROBE_EVERY:
            return True
        self._watched, self._names, self._looked_up = directory, names, 0
        return False

    def looked_up(self, parent: int) -> None:
        if parent == self._watched:
            self._looked_up += 1


class _Listing:
    """One directory's entries as decoded, and their EntryAttributes once a reply needed them."""

    __slots__ = ("entries", "inos", "modes", "names", "plain")

    def __init__(self, listing: Listing) -> None:
        self.names, self.inos, self.modes = listing.names, listing.inos, listing.modes
        self.entries: list[pyfuse3.EntryAttributes | None] = [None] * len(self.names)
        self.plain = sum(1 for m in self.modes if m & _S_IFMT != _S_IFDIR)  # non-directories


class _ListingReadahead:
    """Decode the listings a tree walker will ask for next while the daemon has nothing to do.

    Walkers (``find``, ``ls -R``, ``os.walk``, ``du``) list a directory, then each of its
    subdirectories in order, depth first, and between two listings the daemon waits while the
    kernel and the walker process the last reply. In that gap this decodes the next listings,
    in the walker's order (a stack of subdirectories, first on top), into the adapter's
    listing cache: a cold walk then costs the daemon little more than its round trips.

    Bounded so a walk that stops wastes little: at most ``AHEAD`` listings decoded and not yet
    asked for, ``STACK`` directories remembered, none bigger than ``MAX_ENTRIES`` (their
    decode would hold up requests), one listing per event-loop step (a request waits for at
    most one small decode).
    """

    AHEAD = 16
    STACK = 4096
    MAX_ENTRIES = 4096

    def __init__(self, adapter: FuseAdapter) -> None:
        self._adapter = adapter
        self._stack: list[int] = []
        self._unused: set[int] = set()  # decoded here, not asked for yet
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def listed(self, ino: int, listing: _Listing) -> None:
        """A listing of ``ino`` starts: its subdirectories come next, the first one first."""
        if ino in self._unused:
            self._unused.discard(ino)
        else:  # not where this expected the walker (or no walker): start afresh from here
            self._unused.clear()
        if self._stopped:
            return
        self._push(listing)
        if self._task is None and self._stack:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _push(self, listing: _Listing) -> None:
        self._stack.extend(reversed([child for child, mode in zip(listing.inos, listing.modes,
                                                                  strict=True)
                                     if mode & _S_IFMT == _S_IFDIR]))
        del self._stack[: max(0, len(self._stack) - self.STACK)]  # keep the newest

    async def _run(self) -> None:
        adapter, stack = self._adapter, self._stack
        try:
            while len(self._unused) < self.AHEAD:
                while stack and stack[-1] in adapter._dirs:
                    stack.pop()
                if not stack:
                    break
                await asyncio.sleep(0)  # requests that arrived meanwhile go first
                if not stack or stack[-1] in adapter._dirs:
                    continue
                ino = stack.pop()
                try:
                    if adapter.fs.opendir(ino) > self.MAX_ENTRIES:
                        continue
                    listing = adapter._listing(ino)
                except (FsError, pyfuse3.FUSEError):
                    continue  # the walker gets the error when it gets there
                self._unused.add(ino)
                self._push(listing)
        finally:
            self._task = None

    def stop(self) -> None:
        self._stopped = True
        self._stack.clear()
        if self._task is not None:
            self._task.cancel()


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
        # keep decoded listings of recently listed directories, bounded in entries, with each
        # entry's EntryAttributes made the first time a reply needs it.
        self._dirs: OrderedDict[int, _Listing] = OrderedDict()
        self._dir_entries = 0
        self._dir_limit = dir_cache_entries
        self._policy = _ListingPolicy()
        self._name_only = _name_only_template()
        self._ahead = _ListingReadahead(self)
        self._xattrs = fs.has_xattrs  # none at all: ENOSYS, see the module docstring

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
        self._policy.looked_up(parent_inode)
        return self._entry(self._call(lambda: self.fs.lookup(parent_inode, name)))

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._entry(self._call(lambda: self.fs.getattr(inode)))

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        result: bytes = self._call(lambda: self.fs.readlink(inode))
        return result

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode not in self._dirs:  # a listed directory is one
            self._call(partial(self.fs.opendir, inode))  # ENOTDIR/ENOENT now, not at readdir
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        listing = self._listing(fh)
        if start_id <= 0:
            self._ahead.listed(fh, listing)
        names, inos, modes, entries = listing.names, listing.inos, listing.modes, listing.entries
        start = max(start_id, 0)
        plus = True
        if self._name_only is not None:
            plus = (self._policy.start_listing(fh, listing.plain) if start == 0
                    else self._policy.plus)
        template, template_ino = self._name_only or (None, None)
        reply = pyfuse3.readdir_reply
        for i in range(start, len(names)):
            mode = modes[i]
            if plus or mode & _S_IFMT == _S_IFDIR:
                e = entries[i]
                if e is None:
                    e = entries[i] = self._entry(self._call(partial(self.fs.getattr, inos[i])))
            else:  # d_ino and d_type only: see _name_only_template
                assert template is not None and template_ino is not None
                template_ino.value = inos[i]
                template.st_mode = mode
                e = template
            if not reply(token, names[i], e, i + 1):
                break

    def close(self) -> None:
        """Stop background work (the listing readahead); the loop is about to stop."""
        self._ahead.stop()

    def _listing(self, ino: int) -> _Listing:
        listing = self._dirs.get(ino)
        if listing is not None:
            self._dirs.move_to_end(ino)
            return listing
        listing = _Listing(self._call(partial(self.fs.listdir, ino)))
        size = len(listing.names)
        if size <= self._dir_limit:
            self._dirs[ino] = listing
            self._dir_entries += size
            while self._dir_entries > self._dir_limit:
                _, old = self._dirs.popitem(last=False)
                self._dir_entries -= len(old.names)
        return listing

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
        if not self._xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        result: bytes = self._call(lambda: self.fs.getxattr(inode, name))
        return result

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        if not self._xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
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
    Once the mount is ready, ``fs.load_bootstrap`` copies the bootstrap into memory in the
    background (if ``fs`` was given a ``bootstrap_memory`` it fits in).
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
        loading = loop.create_task(fs.load_bootstrap())  # after ready: mount time stays flat
        try:
            await pyfuse3.main()
        finally:
            loading.cancel()
            adapter.close()
            if stop is not None:
                await stop()
            await fs.backend.close()  # only once FUSE no longer calls into it

    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(main())
    finally:
        if started:
            pyfuse3.close(unmount=True)
