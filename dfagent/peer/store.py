"""The peer's chunk store: chunk files by digest on local disk, bounded by a quota.

This is the node's one on-disk chunk cache (nydusfs keeps none of its own with ``backend:
dragonfly``): the local API hands out paths into it, the upload server serves from it, the
fetcher fills it. Layout under ``data_dir``::

    chunks/<first 2 hex>/<64 hex blake3>    one chunk file (``nydusfs.format.chunkfile``)
    tmp/<pid>-<n>                           writes in progress

Contracts:

* Content addressed: a file's name is the blake3 of its decoded bytes; names are only built
  from digests that passed :func:`check_digest` (64 lowercase hex), so nothing else on disk can
  be named through the store.
* Atomic writes: a chunk is written to ``tmp/`` and renamed into place; a reader never sees a
  partial file. Files are not fsynced: after a crash a file may be short or garbage, which the
  checks below catch.
* Checked on read: :meth:`read` checks a file's structure (header, sizes, the digest inside
  it); :meth:`read_verified` also decodes it and checks its blake3. A file that fails is
  deleted and reported as missing, so the caller fetches it again. Files are written only after
  the fetcher verified their bytes.
* Recent chunks in memory: the bytes of the latest chunks stored (at most ``memory`` bytes,
  ``upload.memory``) are kept and :meth:`read` returns them without touching the disk. When an
  image fans out, every peer asks for a chunk within seconds of its arrival; reading it back
  from a file each time (open, read, a thread for big ones) was a tenth of a busy peer's CPU.
  Those bytes were verified before they were stored, so they need no structure check;
  :meth:`read_verified` still checks the file itself (a co-located client reads the file).
* Quota: after a write, least recently used chunks are evicted until the total is within
  ``quota``; :meth:`put` returns what it evicted so the agent withdraws it at the supernode.
  Recency is in memory while the agent runs; at start-up it comes from file mtimes (the time
  a chunk was written).
* Restart: :meth:`open` rebuilds the index from the directory (dropping files whose header
  does not check out and stale temp files) and returns every digest, which the agent announces.

Index changes happen on the event loop only. Disk I/O of files up to ``INLINE_IO`` bytes runs
on the event loop, bigger ones in worker threads: most chunks of an image are small (files of
a few KiB), and handing each to a thread cost more than the write or read itself (thread
switches, futures: about a fifth of a busy peer's CPU in the fan-out benchmark). Bigger ones
stay off the loop even though that costs CPU too (1 MiB chunks were written on the loop for a
while: less CPU, but a disk that stalls — a VM's, network block storage — then freezes every
upload and fetch of the node, and in fan-out runs requesters timed out on such nodes).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from nydusfs.errors import IntegrityError
from nydusfs.format import chunkfile

__all__ = ["ChunkStore", "StoreStats", "check_digest"]

_DIGEST = re.compile(r"[0-9a-f]{64}")


def check_digest(digest: str) -> bool:
    """True when ``digest`` is a chunk digest the store may turn into a file name."""
    return isinstance(digest, str) and _DIGEST.fullmatch(digest) is not None


@dataclass(slots=True)
class StoreStats:
    chunks: int = 0
    bytes: int = 0
    evictions: int = 0
    corrupt: int = 0  # files dropped because they failed a check
    errors: int = 0  # writes that failed (disk full, permissions)


INLINE_IO = 256 << 10  # bytes: files up to this size are read and written on the event loop


class ChunkStore:
    """Chunk files under ``data_dir`` with LRU eviction at ``quota`` bytes (module docstring)."""

    def __init__(self, data_dir: Path, quota: int, *, memory: int = 0) -> None:
        if quota < 0 or memory < 0:
            raise ValueError(f"quota and memory must be >= 0, got {quota}, {memory}")
        self.dir = Path(data_dir)
        self.quota = quota
        self._chunks = self.dir / "chunks"
        self._tmp = self.dir / "tmp"
        # The same as strings: a chunk's path is built for every write and read, and pathlib's
        # joins were ~4% of a busy peer's Python time in the fan-out.
        self._chunks_prefix = f"{self._chunks}{os.sep}"
        self._tmp_prefix = f"{self._tmp}{os.sep}{os.getpid()}-"
        self._index: OrderedDict[str, int] = OrderedDict()  # digest -> file size, LRU first
        self._total = 0
        self.counters = StoreStats()
        self._tmp_names = itertools.count()
        # The latest chunks stored, their bytes (verified before they were stored), oldest
        # first, at most ``memory`` bytes: what peers ask for right after it arrived.
        self.memory = memory
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._recent_bytes = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> list[str]:
        """Create the directories, rebuild the index; every digest held (oldest first).

        Raises ``OSError`` when the directory cannot be created or listed.
        """
        found = await asyncio.to_thread(self._scan)
        self._index = OrderedDict((d, size) for d, size, _ in found)
        self._total = sum(size for _, size, _ in found)
        evicted = self._evict_over_quota()  # the quota may have shrunk since the last run
        if evicted:
            await asyncio.to_thread(self._unlink_many, evicted)
        return list(self._index)

    def _scan(self) -> list[tuple[str, int, float]]:
        self._chunks.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        for entry in os.scandir(self._tmp):  # writers that died
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        found: list[tuple[str, int, float]] = []
        for sub in os.scandir(self._chunks):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(sub.path):
                name = entry.name
                try:
                    st = entry.stat(follow_symlinks=False)
                    ok = (check_digest(name) and name[:2] == sub.name and entry.is_file(
                        follow_symlinks=False) and self._header_ok(entry.path, name, st.st_size))
                except OSError:
                    ok = False
                if not ok:
                    self.counters.corrupt += 1
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                    continue
                found.append((name, st.st_size, st.st_mtime))
        found.sort(key=lambda t: t[2])
        # All 256 subdirectories now, at start: not one by one while an image is arriving,
        # on the event loop, when each costs a journal update on a busy disk.
        for i in range(256):
            (self._chunks / f"{i:02x}").mkdir(exist_ok=True)
        return found

    @staticmethod
    def _header_ok(path: str, digest: str, size: int) -> bool:
        """The header says chunk ``digest`` and a payload that fills the file (not decoded:
        a full check of every file would make a restart cost a read of the whole store)."""
        with open(path, "rb") as f:
            head = f.read(chunkfile.HEADER_SIZE)
        return (len(head) == chunkfile.HEADER_SIZE and head[:4] == chunkfile.MAGIC
                and head[16:48].hex() == digest
                and int.from_bytes(head[12:16], "little") == size - chunkfile.HEADER_SIZE)

    # -- queries --------------------------------------------------------------------------

    def __contains__(self, digest: str) -> bool:
        return digest in self._index

    def __len__(self) -> int:
        return len(self._index)

    def digests(self) -> list[str]:
        return list(self._index)

    @property
    def total(self) -> int:
        return self._total

    def stats(self) -> StoreStats:
        self.counters.chunks = len(self._index)
        self.counters.bytes = self._total
        return self.counters

    def path_of(self, digest: str) -> Path:
        return Path(self._file(digest))

    def _file(self, digest: str) -> str:
        """The chunk file's path (``path_of``, as a string); ``ValueError`` for anything but a
        chunk digest: the one way a digest becomes a file name."""
        if not check_digest(digest):
            raise ValueError(f"not a chunk digest: {digest!r}")
        return f"{self._chunks_prefix}{digest[:2]}{os.sep}{digest}"

    def touch(self, digest: str) -> bool:
        """Mark ``digest`` recently used; False when the store does not hold it."""
        if digest not in self._index:
            return False
        self._index.move_to_end(digest)
        return True

    async def read(self, digest: str, *, disk: bool = False) -> bytes | None:
        """The chunk file, structure-checked (not decoded); None when missing or dropped.
        ``disk``: the file itself, even when its bytes are in memory."""
        if not self.touch(digest):
            return None
        data = None if disk else self._recent.get(digest)
        if data is not None:
            return data
        try:
            if self._index[digest] <= INLINE_IO:
                data = self._read_file(digest)
            else:
                data = await asyncio.to_thread(self._read_file, digest)
        except FileNotFoundError:
            self._forget(digest)
            return None
        except OSError:
            return None
        try:
            chunkfile.unpack(data, bytes.fromhex(digest))
        except IntegrityError:
            await self.drop(digest, corrupt=True)
            return None
        return data

    async def read_verified(self, digest: str, uncompressed_size: int | None = None
                            ) -> bytes | None:
        """The chunk file after a full decode and blake3 check; a bad file is dropped. It is
        the file on disk that is checked, not a copy in memory: a client that found a chunk
        bad read the file (co-located reads go by path)."""
        data = await self.read(digest, disk=True)
        if data is None:
            return None
        try:
            await asyncio.to_thread(chunkfile.unpack_verified, data, bytes.fromhex(digest),
                                    uncompressed_size)
        except IntegrityError:
            await self.drop(digest, corrupt=True)
            return None
        return data

    def _read_file(self, digest: str) -> bytes:
        with open(self._file(digest), "rb") as f:
            return f.read(chunkfile.MAX_FRAME_BODY + 1)

    # -- changes --------------------------------------------------------------------------

    async def put(self, digest: str, data: bytes) -> list[str]:
        """Store a verified chunk file atomically; the digests evicted to make room.

        A chunk bigger than the quota is not stored. Disk trouble is counted, not raised: the
        chunk was fetched and is delivered from memory anyway.
        """
        path = self._file(digest)
        if digest in self._index:
            self._index.move_to_end(digest)
            return []
        if len(data) > self.quota:
            return []
        try:
            if len(data) <= INLINE_IO:
                self._write(path, data)
            else:
                await asyncio.to_thread(self._write, path, data)
        except OSError:
            self.counters.errors += 1
            return []
        if digest not in self._index:
            self._index[digest] = len(data)
            self._total += len(data)
            self._remember(digest, data)
        evicted = self._evict_over_quota(keep=digest)
        if evicted:
            await asyncio.to_thread(self._unlink_many, evicted)
        return evicted

    def _remember(self, digest: str, data: bytes) -> None:
        if len(data) > self.memory:
            return
        self._recent[digest] = data
        self._recent_bytes += len(data)
        while self._recent_bytes > self.memory:
            _, old = self._recent.popitem(last=False)
            self._recent_bytes -= len(old)

    def _unremember(self, digest: str) -> None:
        data = self._recent.pop(digest, None)
        if data is not None:
            self._recent_bytes -= len(data)

    def _write(self, path: str, data: bytes) -> None:
        # chunks/<xx>/ exists: open() made all 256. The agent is the only writer of tmp/
        # (one per data_dir), so pid + counter is unique.
        tmp = f"{self._tmp_prefix}{next(self._tmp_names)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _evict_over_quota(self, keep: str | None = None) -> list[str]:
        victims: list[str] = []
        while self._total > self.quota and self._index:
            digest, size = next(iter(self._index.items()))
            if digest == keep:
                if len(self._index) == 1:
                    break
                self._index.move_to_end(digest)
                continue
            del self._index[digest]
            self._total -= size
            self._unremember(digest)
            victims.append(digest)
        self.counters.evictions += len(victims)
        return victims

    def _unlink_many(self, digests: list[str]) -> None:
        for d in digests:
            with contextlib.suppress(OSError):
                os.unlink(self._file(d))

    def _forget(self, digest: str) -> None:
        size = self._index.pop(digest, None)
        if size is not None:
            self._total -= size
        self._unremember(digest)

    async def drop(self, digest: str, *, corrupt: bool = False) -> None:
        """Remove a chunk (a bad file, or one found missing); the caller withdraws it."""
        self._forget(digest)
        if corrupt:
            self.counters.corrupt += 1
        await asyncio.to_thread(self._unlink_many, [digest])
