"""The local chunk cache: decoded chunks on disk by digest, verified on every read.

This is the ``ChunkStore`` of ``nydusfs.fs.model`` for remote backends. It stores *decoded*
chunk bytes, so a hit costs one file read and one blake3, no zstd. It trusts nothing it reads
back: a file whose length or blake3 differs from what was asked for is deleted and reported
as a miss, so the filesystem refetches from the backend. It never raises for cache trouble
(a full disk, a cache dir that is a file, a permission error): every such failure is a miss
or a skipped write, counted in :meth:`DiskChunkStore.stats`.

Layout under the cache dir (shared by every mount and process pointed at it)::

    <dir>/chunks/<first 2 hex>/<64 hex blake3>   one decoded chunk, nothing else
    <dir>/tmp/<random>                           writes in progress

A write goes to a temp file in ``tmp/`` and is renamed into place, so a reader never sees a
partial chunk and concurrent writers of one digest are harmless (the last rename wins, with
identical bytes). Nothing is fsynced: after a crash a chunk file may be short or garbage, which
the read-side check catches. A file's mtime is its last use (set on write and on every hit),
so recency survives a restart.

Quota: each ``DiskChunkStore`` keeps an index of the dir (digest -> size, last use), built by
scanning on first use, and after a write evicts least recently used chunks until its view of
the total is within the quota. When several processes share the dir each sees the others'
chunks only when it reads them or at a rescan (on a write, at most every ``rescan_interval``
seconds), so the quota is enforced per process view and only approximately across
processes; another process's recent hits count through the mtimes it sets.

All disk I/O runs in a worker thread (``asyncio.to_thread``): the event loop also serves FUSE.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from nydusfs.format.chunk import chunk_digest
from nydusfs.format.layout import MAX_CHUNK_SIZE

__all__ = ["DiskChunkStore"]

DIGEST_SIZE = 32
_HEX = frozenset("0123456789abcdef")
_STALE_TMP_SECONDS = 3600.0  # a temp file this old belongs to a writer that died


class DiskChunkStore:
    """A ``ChunkStore`` in a directory, bounded by ``quota`` bytes with LRU eviction.

    ``get`` returns the chunk only if it is exactly ``size`` bytes with blake3 ``digest``;
    a file that fails the check is deleted (counted ``corrupt``). ``put`` stores atomically;
    a chunk larger than the quota is not stored. Neither raises for I/O trouble (counted
    ``errors``); a digest that is not 32 bytes is a caller bug and raises ``ValueError``.

    Safe to use from several event loops and threads at once; the index is guarded by a lock
    that is never held by the event loop thread across I/O.
    """

    def __init__(self, dir: Path, quota: int, *, clock: Callable[[], float] = time.time,
                 rescan_interval: float = 60.0) -> None:
        if quota < 0:
            raise ValueError(f"cache quota must be >= 0, got {quota}")
        self.dir = Path(dir)
        self.quota = quota
        self.rescan_interval = rescan_interval
        self._clock = clock
        self._chunks = self.dir / "chunks"
        self._tmp = self.dir / "tmp"
        self._lock = threading.Lock()
        # digest -> (size, last use), least recently used first; None until the first scan.
        self._index: OrderedDict[bytes, tuple[int, float]] | None = None
        self._total = 0
        self._scanned_at = 0.0
        self._writing: set[bytes] = set()  # puts in flight in this process
        self._counts = dict.fromkeys(
            ("hits", "misses", "corrupt", "errors", "evictions", "bytes_stored"), 0)

    # -- ChunkStore -------------------------------------------------------------------------

    async def get(self, digest: bytes, size: int) -> bytes | None:
        """The verified chunk, or None (missing, bad — then deleted — or unreadable)."""
        _check_digest(digest)
        return await asyncio.to_thread(self._get, digest, size)

    async def put(self, digest: bytes, data: bytes) -> None:
        """Store ``data`` under ``digest`` atomically, then evict down to the quota."""
        _check_digest(digest)
        await asyncio.to_thread(self._put, digest, bytes(data))

    # -- introspection ----------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters for metrics, plus this process's view of what is stored.

        ``hits + misses`` is the number of gets; ``corrupt`` (bad files deleted) and ``errors``
        (I/O failures, reads and writes) are causes, not extra outcomes. ``bytes_stored`` counts
        bytes written by ``put``; ``chunks``/``bytes`` are the current index.
        """
        with self._lock:
            out = dict(self._counts)
            out["chunks"] = len(self._index) if self._index is not None else 0
            out["bytes"] = self._total
        return out

    def path_of(self, digest: bytes) -> Path:
        """Where the chunk ``digest`` lives (whether or not it is stored)."""
        hex_ = digest.hex()
        return self._chunks / hex_[:2] / hex_

    # -- worker-thread side -----------------------------------------------------------------

    def _get(self, digest: bytes, size: int) -> bytes | None:
        path = self.path_of(digest)
        try:
            data = _read_bounded(path)
        except FileNotFoundError:
            with self._lock:
                self._forget(digest)
                self._counts["misses"] += 1
            return None
        except OSError:
            with self._lock:
                self._counts["errors"] += 1
                self._counts["misses"] += 1
            return None
        if data is None or chunk_digest(data) != digest:
            # Truncated, overwritten or oversized: never return it, and drop it so the refetched
            # chunk can take its place.
            with contextlib.suppress(OSError):
                path.unlink()
            with self._lock:
                self._forget(digest)
                self._counts["corrupt"] += 1
                self._counts["misses"] += 1
            return None
        if len(data) != size:
            # The file is the genuine chunk; the caller's record disagrees with its own digest.
            # Not the cache's fault: keep the file, give the caller nothing.
            with self._lock:
                self._counts["misses"] += 1
            return None
        now = self._clock()
        with contextlib.suppress(OSError):
            os.utime(path, (now, now))  # recency for restarts and for other processes
        with self._lock:
            self._ensure_index()
            self._touch(digest, len(data), now)
            self._counts["hits"] += 1
        return data

    def _put(self, digest: bytes, data: bytes) -> None:
        if len(data) > min(self.quota, MAX_CHUNK_SIZE):
            return  # could never be kept (quota) or read back (get's bound)
        path = self.path_of(digest)
        with self._lock:
            self._ensure_index()
            if digest in self._writing:
                return  # this process is already writing it
            self._writing.add(digest)
        try:
            now = self._clock()
            try:
                if path.exists():
                    os.utime(path, (now, now))  # someone stored it: just a use
                    written = 0
                else:
                    self._write(path, data, now)
                    written = len(data)
            except OSError:
                with self._lock:
                    self._counts["errors"] += 1
                return
            with self._lock:
                self._touch(digest, len(data), now)
                self._counts["bytes_stored"] += written
                self._evict()
        finally:
            with self._lock:
                self._writing.discard(digest)

    def _write(self, path: Path, data: bytes, now: float) -> None:
        self._tmp.mkdir(parents=True, exist_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix=path.name[:16] + ".")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide it from other users
                f.write(data)
            os.utime(tmp, (now, now))
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # -- index (caller holds self._lock) ----------------------------------------------------

    def _ensure_index(self) -> None:
        if self._index is None:
            self._rescan()

    def _rescan(self) -> None:
        """Rebuild the index from the dir (mtime = last use); also clears stale temp files."""
        found: list[tuple[float, bytes, int]] = []
        with contextlib.suppress(OSError):
            for sub in os.scandir(self._chunks):
                if not (len(sub.name) == 2 and sub.is_dir(follow_symlinks=False)):
                    continue
                with contextlib.suppress(OSError):
                    for entry in os.scandir(sub.path):
                        digest = _parse_name(entry.name)
                        if digest is None:
                            continue
                        with contextlib.suppress(OSError):
                            st = entry.stat(follow_symlinks=False)
                            found.append((st.st_mtime, digest, st.st_size))
        found.sort()
        self._index = OrderedDict((d, (size, used)) for used, d, size in found)
        self._total = sum(size for _, _, size in found)
        self._scanned_at = self._clock()
        with contextlib.suppress(OSError):
            for entry in os.scandir(self._tmp):
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < self._scanned_at - _STALE_TMP_SECONDS:
                        os.unlink(entry.path)

    def _touch(self, digest: bytes, size: int, now: float) -> None:
        assert self._index is not None
        old = self._index.pop(digest, None)
        if old is not None:
            self._total -= old[0]
        self._index[digest] = (size, now)
        self._total += size

    def _forget(self, digest: bytes) -> None:
        if self._index is not None:
            old = self._index.pop(digest, None)
            if old is not None:
                self._total -= old[0]

    def _evict(self) -> None:
        """Remove least recently used chunks until the index is within the quota.

        First rescan if the last scan is ``rescan_interval`` old, so chunks other processes
        added, used or removed are counted; between rescans the view is this process's only.
        """
        if self._clock() - self._scanned_at >= self.rescan_interval:
            self._rescan()
        assert self._index is not None
        while self._total > self.quota and self._index:
            digest, (size, _) = self._index.popitem(last=False)
            self._total -= size
            try:
                self.path_of(digest).unlink()
            except FileNotFoundError:
                continue  # another process evicted it first
            except OSError:
                self._counts["errors"] += 1
                continue
            self._counts["evictions"] += 1


def _check_digest(digest: bytes) -> None:
    if len(digest) != DIGEST_SIZE:
        raise ValueError(f"chunk digest must be {DIGEST_SIZE} bytes, got {len(digest)}")


def _parse_name(name: str) -> bytes | None:
    if len(name) != 2 * DIGEST_SIZE or not _HEX.issuperset(name):
        return None
    return bytes.fromhex(name)


def _read_bounded(path: Path) -> bytes | None:
    """The file's bytes, or None if it is larger than any chunk can be (then it is corrupt)."""
    with open(path, "rb") as f:
        data = f.read(MAX_CHUNK_SIZE + 1)
    return None if len(data) > MAX_CHUNK_SIZE else data
