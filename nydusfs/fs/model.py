"""The read-only filesystem model: what a mounted image answers, with no FUSE in sight.

``ImageFS`` turns a ``Bootstrap`` and a storage ``Backend`` into filesystem operations
(lookup, getattr, readdir, readlink, xattrs, read, statfs). The pyfuse3 adapter in ``fuse.py``
only translates calls and errors; everything testable lives here.

The read path: (inode, offset, size) → the chunk records covering it → decoded chunks from a
bounded in-memory LRU, or fetched from the backend. Concurrent readers of one chunk share one
fetch (single flight). Chunks needed by one read that lie close together in the same blob are
fetched with one ranged read (``merge_window``). Every fetched payload is verified by
``format.chunk.decode`` before anything is returned; a chunk that stays bad after a refetch, or
cannot be fetched, fails that read with ``FsError(EIO)`` — never wrong bytes.

Errors leave this module as ``FsError(errno)`` only.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from nydusfs.errors import FormatError, IntegrityError, StorageError
from nydusfs.format.chunk import decode
from nydusfs.format.reader import Bootstrap
from nydusfs.format.records import ChunkRecord, Inode, Listing
from nydusfs.storage.base import Backend, ChunkInfo, RangeRequest

__all__ = ["Attr", "ChunkStore", "FsError", "FsObserver", "FsStats", "ImageFS"]

log = logging.getLogger(__name__)

BLOCK = 512
# Chunks up to this size are decoded on the event loop: verifying and decompressing 64 KiB
# takes tens of microseconds, less than handing it to a thread and back (most files of a
# rootfs are this small). Bigger chunks go to a thread so the loop keeps serving.
INLINE_DECODE = 64 * 1024


class FsError(Exception):
    """A filesystem error with its errno; the only exception ``ImageFS`` raises."""

    def __init__(self, errno_: int, msg: str = "") -> None:
        super().__init__(msg or errno.errorcode.get(errno_, str(errno_)))
        self.errno = errno_


@dataclass(slots=True)  # not frozen: built per lookup/readdir entry (see format.records.Inode)
class Attr:
    """What stat(2) reports. atime and ctime equal mtime: the image records only mtime."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    rdev: int
    mtime_ns: int
    blocks: int

    @classmethod
    def of(cls, node: Inode) -> Attr:
        size = node.size
        return cls(node.ino, node.mode, node.nlink, node.uid, node.gid, size, node.rdev,
                   node.mtime_ns, (size + BLOCK - 1) // BLOCK if node.is_reg() else 0)


@dataclass(slots=True)
class FsStats:
    """Counters for ``nydusfs stat`` and metrics (issue 3's Prometheus export builds on these)."""

    reads: int = 0
    bytes_read: int = 0
    chunk_hits: int = 0
    chunk_misses: int = 0
    chunks_fetched: int = 0
    bytes_fetched: int = 0
    backend_requests: int = 0
    verification_failures: int = 0
    read_errors: int = 0
    readahead_errors: int = 0
    store_hits: int = 0
    fetched_by_blob: dict[int, int] = field(default_factory=dict)
    bootstrap_resident_bytes: int = 0  # the bootstrap's copy in memory (0: mapped, see ImageFS)


class _ChunkLRU:
    """Decoded chunks by digest, bounded in bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self._items: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, digest: bytes) -> bytes | None:
        data = self._items.get(digest)
        if data is not None:
            self._items.move_to_end(digest)
        return data

    def put(self, digest: bytes, data: bytes) -> None:
        if digest in self._items or len(data) > self.capacity:
            return
        self._items[digest] = data
        self.size += len(data)
        while self.size > self.capacity:
            _, old = self._items.popitem(last=False)
            self.size -= len(old)


class ChunkStore(Protocol):
    """A persistent chunk cache (``storage/cache.py``): decoded chunks by digest.

    ``get`` returns the chunk only if it verifies against ``digest`` (a bad cached file is
    dropped and None returned, so the caller refetches); ``put`` is atomic. Neither raises for
    cache trouble: a cache that cannot read or write behaves as a miss.
    """

    async def get(self, digest: bytes, size: int) -> bytes | None: ...

    async def put(self, digest: bytes, data: bytes) -> None: ...


class FsObserver(Protocol):
    """Hooks for metrics (``nydusfs/metrics.py``); every method must be cheap and not raise."""

    def read_done(self, seconds: float, nbytes: int, ok: bool) -> None: ...

    def chunk_fetched(self, backend: str, compressed_bytes: int) -> None: ...

    def cache_hit(self, kind: str) -> None: ...  # "memory" | "disk" | "inflight"

    def cache_miss(self) -> None: ...

    def verification_failure(self, where: str) -> None: ...  # "backend" | "cache"


class ImageFS:
    """Filesystem operations over one image. Not thread safe: one event loop drives it.

    On-demand reads have priority over background work: ``chunks(..., background=True)``
    (the prefetcher) waits while any on-demand read is in progress.

    Metadata residency (``bootstrap_memory``): the bootstrap starts mapped, so mounting costs
    the same whatever its size; ``load_bootstrap`` (run once the mount is ready) then copies
    a bootstrap of at most ``bootstrap_memory`` bytes into memory in a thread and swaps it in
    between two requests, as nydusd's RAFS v5 loads its bootstrap. Mapped, every metadata page
    the page cache dropped (memory pressure, ``drop_caches``) comes back by a page fault, one
    4 KiB page at a time, on the event loop; in memory a walk never waits for the disk.
    """

    MAX_DEPTH = 4096  # steps up the parent links when tracing (a path has at most 2048)

    def __init__(
        self,
        boot: Bootstrap,
        backend: Backend,
        *,
        cache_bytes: int = 64 << 20,
        merge_window: int = 128 << 10,
        refetch_on_corruption: int = 1,
        store: ChunkStore | None = None,
        observer: FsObserver | None = None,
        readahead_chunks: int = 0,
        access_trace: BinaryIO | None = None,
        bootstrap_memory: int = 0,
    ) -> None:
        self.boot = boot
        self._bootstrap_memory = bootstrap_memory
        self.backend = backend
        self.store = store
        self.observer = observer
        self.stats = FsStats()
        self._lru = _ChunkLRU(cache_bytes)
        # A per-chunk backend (the P2P agent) gets one request per chunk: gaps are >= 0, so a
        # window of -1 merges nothing, not even adjacent chunks.
        self._merge_window = -1 if getattr(backend, "per_chunk", False) else merge_window
        self._refetch = refetch_on_corruption
        self._readahead = readahead_chunks
        self._inflight: dict[bytes, asyncio.Future[bytes]] = {}
        self._foreground = 0
        self._idle: asyncio.Event | None = None  # created on the running loop
        self._last_end: dict[int, int] = {}  # ino -> end of the last read (sequential?)
        self._tasks: set[asyncio.Task[None]] = set()
        # Access trace: the path of each file the first time it is read, in order; the file
        # is a valid `nydusfs build --prefetch` list. Paths come from the image itself (each
        # inode records its parent directory), not from the lookups the kernel sends: a
        # listing with attributes (READDIRPLUS) gives the kernel dentries without a LOOKUP,
        # so a file whose directory was listed first is opened without one.
        self._trace = access_trace
        self._paths: dict[int, bytes] = {1: b"/"}  # directories' paths, as resolved
        self._names: dict[int, dict[int, bytes]] = {}  # directory -> {child ino: name}
        self._traced: set[int] = set()
        # Wall-clock times (time.time()): the first read asked for, the latest one answered;
        # when a starting container began and stopped reading (the status API's timeline).
        self.first_read_at: float | None = None
        self.last_read_at: float | None = None

    # ---- metadata ---------------------------------------------------------------------

    @property
    def has_xattrs(self) -> bool:
        """Whether any inode of the image has an extended attribute."""
        return self.boot.header.count("xattrs") > 0

    async def load_bootstrap(self) -> bool:
        """Copy the bootstrap into memory if it is at most ``bootstrap_memory`` bytes.

        The file is read and checked (header checksum) in a thread while requests go on being
        answered from the mapping; the copy replaces it here, on the event loop, between two
        requests. True if the bootstrap is now in memory. Never raises for a bootstrap that
        cannot be loaded (unreadable, or failing its checksum): it stays mapped, as it was,
        and the reason is logged.
        """
        boot = self.boot
        if boot.resident:
            return True
        if not 0 < boot.size <= self._bootstrap_memory:
            return False
        try:
            load = boot.loader()
            if load is None:  # closed meanwhile
                return False
            data = await asyncio.to_thread(load)
            boot.adopt(data)
        except FormatError as exc:
            log.warning("bootstrap stays mapped: %s", exc)
            return False
        self.stats.bootstrap_resident_bytes = len(data)
        return True

    def _inode(self, ino: int) -> Inode:
        try:
            return self.boot.inode(ino)
        except FormatError as exc:
            raise FsError(errno.EIO if 1 <= ino <= self.boot.inode_count else errno.ENOENT,
                          str(exc)) from exc

    def getattr(self, ino: int) -> Attr:
        return Attr.of(self._inode(ino))

    def lookup(self, parent: int, name: bytes) -> Attr:
        node = self._inode(parent)
        if not node.is_dir():
            raise FsError(errno.ENOTDIR)
        try:
            if name == b".":
                return Attr.of(node)
            if name == b"..":
                return Attr.of(self._inode(node.parent))
            entry = self.boot.lookup(node, name)
        except FormatError as exc:
            raise FsError(errno.EIO, str(exc)) from exc
        if entry is None:
            raise FsError(errno.ENOENT)
        return Attr.of(self._inode(entry.ino))

    def readdir(self, ino: int, start: int = 0) -> Iterator[tuple[bytes, Attr, int]]:
        """(name, attributes, offset of the next entry) from position ``start``.

        Offsets are positions in the sorted entry list: stable for an immutable image.
        """
        first = max(start, 0)
        listing = self.listdir(ino, first)
        for i, (name, child) in enumerate(zip(listing.names, listing.inos, strict=True)):
            yield name, self.getattr(child), first + i + 1

    def listdir(self, ino: int, start: int = 0) -> Listing:
        """Names, inode numbers and modes of the entries from position ``start``, at once.

        What a listing that sends names and types needs (``Bootstrap.listdir``: one pass, no
        object per entry); ``getattr`` gives the rest of an entry's attributes.
        """
        node = self._inode(ino)
        if not node.is_dir():
            raise FsError(errno.ENOTDIR)
        try:
            return self.boot.listdir(node, start)
        except FormatError as exc:
            raise FsError(errno.EIO, str(exc)) from exc

    def opendir(self, ino: int) -> int:
        """Number of entries of directory ``ino``; ENOTDIR, ENOENT or EIO if it is none."""
        node = self._inode(ino)
        if not node.is_dir():
            raise FsError(errno.ENOTDIR)
        return node.data_count

    def readlink(self, ino: int) -> bytes:
        node = self._inode(ino)
        if not node.is_symlink():
            raise FsError(errno.EINVAL)
        try:
            return self.boot.readlink(node)
        except FormatError as exc:
            raise FsError(errno.EIO, str(exc)) from exc

    def listxattr(self, ino: int) -> list[bytes]:
        try:
            return [x.name for x in self.boot.xattrs(self._inode(ino))]
        except FormatError as exc:
            raise FsError(errno.EIO, str(exc)) from exc

    def getxattr(self, ino: int, name: bytes) -> bytes:
        try:
            value = self.boot.getxattr(self._inode(ino), name)
        except FormatError as exc:
            raise FsError(errno.EIO, str(exc)) from exc
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def check_open(self, ino: int, write: bool) -> Attr:
        node = self._inode(ino)
        if write:
            raise FsError(errno.EROFS)
        if node.is_dir():
            raise FsError(errno.EISDIR)
        return Attr.of(node)

    def statfs(self) -> dict[str, int]:
        h = self.boot.header
        total = sum(b.size for b in self.boot.blobs())
        return {
            "bsize": 4096, "frsize": 4096, "blocks": (total + 4095) // 4096, "bfree": 0,
            "bavail": 0, "files": self.boot.inode_count, "ffree": 0, "favail": 0,
            "namemax": 255, "chunk_size": h.chunk_size,
        }

    # ---- data ---------------------------------------------------------------------------

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of a regular file (short at EOF); EIO on any failure."""
        node = self._inode(ino)
        if not node.is_reg():
            raise FsError(errno.EISDIR if node.is_dir() else errno.EINVAL)
        if offset < 0 or size < 0:
            raise FsError(errno.EINVAL)
        self.stats.reads += 1
        if self.first_read_at is None:
            self.first_read_at = time.time()
        if self._trace is not None and ino not in self._traced:
            self._record_access(ino)
        t0 = time.monotonic()
        try:
            refs = self.boot.chunks_for_range(node, offset, size)
        except FormatError as exc:
            raise FsError(errno.EIO, str(exc)) from exc
        if not refs:
            return b""
        try:
            datas = await self.chunks([r.chunk for r in refs])
        except FsError:
            self.stats.read_errors += 1
            if self.observer is not None:
                self.observer.read_done(time.monotonic() - t0, 0, False)
            raise
        end = min(offset + size, node.size)
        out = bytearray()
        for ref, data in zip(refs, datas, strict=True):
            lo = max(offset - ref.file_offset, 0)
            hi = min(end - ref.file_offset, len(data))
            out += data[lo:hi]
        self.stats.bytes_read += len(out)
        if self.observer is not None:
            self.observer.read_done(time.monotonic() - t0, len(out), True)
        self.last_read_at = time.time()
        sequential = self._last_end.get(ino) == offset
        self._last_end[ino] = end
        if sequential and self._readahead and end < node.size:
            self._start_readahead(node, end)
        return bytes(out)

    def _record_access(self, ino: int) -> None:
        self._traced.add(ino)
        path = self._path_of(ino)
        if path is None or b"\n" in path or self._trace is None:
            return  # not representable in a line list (or the image is inconsistent)
        try:
            self._trace.write(path + b"\n")  # buffered: a few bytes, no syscall per line
        except OSError:
            self._trace = None  # tracing is best effort; never fail a read for it

    def _path_of(self, ino: int) -> bytes | None:
        """``ino``'s path from the root, by its parent links (a hard link: its first name).

        Once per traced file: each directory on the way is listed once (its names by inode
        kept in ``_names``) and its path kept in ``_paths``. None if the links do not lead to
        the root within ``MAX_DEPTH`` steps (a malformed image).
        """
        chain: list[tuple[int, bytes]] = []  # (inode, its name), from ``ino`` upwards
        child = ino
        base = self._paths.get(child)
        while base is None:
            if len(chain) >= self.MAX_DEPTH:
                return None
            try:
                parent = self.boot.inode(child).parent
                by_ino = self._names.get(parent)
                if by_ino is None:
                    listing = self.boot.listdir(parent)
                    by_ino = {}
                    for child_ino, name in zip(listing.inos, listing.names, strict=True):
                        by_ino.setdefault(child_ino, name)
                    self._names[parent] = by_ino
            except FormatError:
                return None
            found = by_ino.get(child)
            if found is None:
                return None
            chain.append((child, found))
            child = parent
            base = self._paths.get(child)
        path = base
        for child, name in reversed(chain):
            path = (path if path == b"/" else path + b"/") + name
            if child != ino:  # a directory on the way: remember it
                self._paths[child] = path
        return path

    def flush_trace(self) -> None:
        if self._trace is not None:
            try:
                self._trace.flush()
            except OSError:
                self._trace = None

    def _start_readahead(self, node: Inode, end: int) -> None:
        """A sequential reader will want the next chunks: fetch them now, in the background."""
        try:
            span = self._readahead * self.boot.header.chunk_size
            refs = self.boot.chunks_for_range(node, end, span)
        except FormatError:
            return
        records = [r.chunk for r in refs[: self._readahead]]
        if not records:
            return

        async def run() -> None:
            try:
                await self.chunks(records, priority=True)
            except FsError:
                self.stats.readahead_errors += 1  # the on-demand read will report it

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _idle_event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            self._idle.set()
        return self._idle

    def chunks_in_blob_order(self) -> list[ChunkRecord]:
        """Every unique chunk, ordered as stored (what a full prefetch reads, sequentially)."""
        try:
            return sorted(self.boot.chunks(), key=lambda r: (r.blob_index, r.compressed_offset))
        except FormatError as exc:
            raise FsError(errno.EIO, str(exc)) from exc

    def prefetch_list_chunks(self) -> list[ChunkRecord]:
        """Chunks of the bootstrap's prefetch list, in list order, each once."""
        seen: set[bytes] = set()
        out: list[ChunkRecord] = []
        try:
            for ino in self.boot.prefetch():
                for ref in self.boot.file_chunks(ino):
                    if ref.chunk.digest not in seen:
                        seen.add(ref.chunk.digest)
                        out.append(ref.chunk)
        except FormatError as exc:
            raise FsError(errno.EIO, str(exc)) from exc
        return out

    async def chunks(
        self, records: Sequence[ChunkRecord], *, background: bool = False, priority: bool = False
    ) -> list[bytes]:
        """Decoded, verified chunks, in order: memory LRU, a fetch in flight, the disk store, or
        the backend.

        ``background`` (prefetch): wait until no on-demand read is running, and do not fill
        the memory LRU. ``priority`` (readahead): neither waits nor counts as on-demand.
        Otherwise the call is an on-demand read and background work yields to it.
        """
        idle = self._idle_event()
        if background:
            # Re-check after waking: a reader may have started again in the same loop step.
            while self._foreground:
                await idle.wait()
            return await self._chunks(records, keep_in_memory=False)
        if priority:
            return await self._chunks(records, keep_in_memory=True)
        self._foreground += 1
        idle.clear()
        try:
            return await self._chunks(records, keep_in_memory=True)
        finally:
            self._foreground -= 1
            if self._foreground == 0:
                idle.set()

    async def warm(self, records: Sequence[ChunkRecord]) -> list[ChunkRecord]:
        """Background work for a backend with a node-level store (``backend.warms``): have
        ``records`` in that store without reading them here; return those it does not hold,
        for the caller to read with ``chunks``. Waits for on-demand reads, as ``chunks(...,
        background=True)`` does. Why: ``storage.base``, "Node-level stores"."""
        if not records or not getattr(self.backend, "warms", False):
            return list(records)
        idle = self._idle_event()
        while self._foreground:
            await idle.wait()
        requests = [self._range([rec])[0] for rec in records]
        try:
            held = await self.backend.warm(requests)
        except StorageError as exc:
            log.info("warming %d chunks failed (%s); reading them instead", len(records), exc)
            return list(records)
        return [rec for rec, ok in zip(records, held, strict=True) if not ok]

    async def _chunks(self, records: Sequence[ChunkRecord], keep_in_memory: bool) -> list[bytes]:
        obs = self.observer
        result: dict[bytes, bytes] = {}
        waits: dict[bytes, asyncio.Future[bytes]] = {}
        mine: dict[bytes, ChunkRecord] = {}
        for rec in records:
            d = rec.digest
            if d in result or d in waits or d in mine:
                continue
            cached = self._lru.get(d)
            if cached is not None:
                self.stats.chunk_hits += 1
                result[d] = cached
                if obs is not None:
                    obs.cache_hit("memory")
            elif d in self._inflight:
                self.stats.chunk_hits += 1
                waits[d] = self._inflight[d]
                if obs is not None:
                    obs.cache_hit("inflight")
            else:
                mine[d] = rec
        if mine:
            loop = asyncio.get_running_loop()
            futs = {d: loop.create_future() for d in mine}
            self._inflight.update(futs)
            try:
                fetched = await self._from_store(mine)
                missing = [rec for d, rec in mine.items() if d not in fetched]
                if missing:
                    from_backend = await self._fetch(missing)
                    if self.store is not None:
                        for d, data in from_backend.items():
                            await self.store.put(d, data)
                    fetched.update(from_backend)
                for d, data in fetched.items():
                    if keep_in_memory:
                        self._lru.put(d, data)
                    futs[d].set_result(data)
                result.update(fetched)
            except BaseException as exc:
                # Waiters share this fetch: they must never hang, even if it was cancelled.
                err = exc if isinstance(exc, FsError) else FsError(errno.EIO, "fetch interrupted")
                for f in futs.values():
                    if not f.done():
                        f.set_exception(err)
                        f.exception()  # mark retrieved: waiters may not exist
                raise
            finally:
                for d in futs:
                    self._inflight.pop(d, None)
        for d, fut in waits.items():
            result[d] = await asyncio.shield(fut)
        return [result[r.digest] for r in records]

    async def _from_store(self, wanted: dict[bytes, ChunkRecord]) -> dict[bytes, bytes]:
        """Chunks the disk store holds (verified there); counts hits and misses."""
        found: dict[bytes, bytes] = {}
        store = self.store
        if store is not None:  # the lookups run in threads: issue them together
            datas = await asyncio.gather(*(store.get(d, rec.uncompressed_size)
                                           for d, rec in wanted.items()))
        else:
            datas = [None] * len(wanted)
        for d, data in zip(wanted, datas, strict=True):
            if data is not None:
                found[d] = data
                self.stats.store_hits += 1
                if self.observer is not None:
                    self.observer.cache_hit("disk")
            else:
                self.stats.chunk_misses += 1
                if self.observer is not None:
                    self.observer.cache_miss()
        return found

    def _plan(self, records: list[ChunkRecord]) -> list[tuple[RangeRequest, list[ChunkRecord]]]:
        """Group chunks into ranged reads: same blob, gaps no larger than the merge window."""
        plans: list[tuple[RangeRequest, list[ChunkRecord]]] = []
        ordered = sorted(records, key=lambda r: (r.blob_index, r.compressed_offset))
        group: list[ChunkRecord] = []
        for rec in ordered:
            if group:
                last = group[-1]
                gap = rec.compressed_offset - (last.compressed_offset + last.compressed_size)
                if rec.blob_index == last.blob_index and gap <= self._merge_window:
                    group.append(rec)
                    continue
                plans.append(self._range(group))
            group = [rec]
        if group:
            plans.append(self._range(group))
        return plans

    def _range(self, group: list[ChunkRecord]) -> tuple[RangeRequest, list[ChunkRecord]]:
        start = group[0].compressed_offset
        end = max(r.compressed_offset + r.compressed_size for r in group)
        blob = self.boot.blob(group[0].blob_index).hex
        if len(group) == 1:  # a chunk-aware backend can serve it by digest
            r = group[0]
            chunk = ChunkInfo(r.digest, r.flags, r.uncompressed_size)
            return RangeRequest(blob, start, end - start, chunk), group
        return RangeRequest(blob, start, end - start), group

    async def _fetch(self, records: list[ChunkRecord]) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        todo = records
        for attempt in range(self._refetch + 1):
            plans = self._plan(todo)
            try:
                payloads = await self.backend.read_many([req for req, _ in plans])
            except StorageError as exc:
                raise FsError(errno.EIO, str(exc)) from exc
            self.stats.backend_requests += len(plans)
            bad: list[ChunkRecord] = []
            for (req, group), payload in zip(plans, payloads, strict=True):
                self.stats.bytes_fetched += len(payload)
                for rec in group:
                    lo = rec.compressed_offset - req.offset
                    piece = payload[lo : lo + rec.compressed_size]
                    try:
                        if rec.uncompressed_size <= INLINE_DECODE:
                            data = decode(piece, rec.flags, rec.uncompressed_size, rec.digest)
                        else:
                            data = await asyncio.to_thread(
                                decode, piece, rec.flags, rec.uncompressed_size, rec.digest)
                    except IntegrityError:
                        self.stats.verification_failures += 1
                        if self.observer is not None:
                            self.observer.verification_failure("backend")
                        bad.append(rec)
                        continue
                    self.stats.chunks_fetched += 1
                    if self.observer is not None:
                        self.observer.chunk_fetched(self.backend.name, rec.compressed_size)
                    by_blob = self.stats.fetched_by_blob
                    by_blob[rec.blob_index] = by_blob.get(rec.blob_index, 0) + 1
                    out[rec.digest] = data
            if not bad:
                return out
            todo = bad
            if attempt == self._refetch:
                raise FsError(errno.EIO, f"chunk {bad[0].hex}: failed verification")
        return out
