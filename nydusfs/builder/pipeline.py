"""Chunk pipeline and spool: hashing and compression off the main thread, in bounded memory.

The main thread reads sources (directory files in layout order, or tar members as the archive
streams past) and cuts chunks; a thread pool hashes (blake3) and compresses (zstd) them — both
release the GIL, so the build uses every core. Results are consumed in submission order, so a
file's chunk list is in file order whatever the workers' timing. At most ``window`` chunks are in
flight, which bounds memory at ``window x chunk size`` whatever the tree's size.

Unique compressed payloads go to the *spool*, an append-only file beside the output. ``assemble``
then writes the blob in layout order. When the spool already is in that order (a directory
source) it simply becomes the blob; otherwise (tar layers, where data arrives in archive order
and deleted files must not be stored) only the referenced payloads are copied, in order.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from nydusfs.builder.chunker import Chunker
from nydusfs.builder.tree import Node
from nydusfs.errors import BuildError
from nydusfs.format.chunk import chunk_digest, encode
from nydusfs.format.reader import Bootstrap
from nydusfs.format.writer import ChunkPlacement

__all__ = ["AssembledBlobs", "ChunkPipeline", "Spool"]


@dataclass(frozen=True, slots=True)
class _Spooled:
    offset: int
    compressed_size: int
    uncompressed_size: int
    flags: int


@dataclass(slots=True)
class AssembledBlobs:
    """The blob table of the new image and where every referenced chunk lies."""

    blobs: list[tuple[bytes, int]]  # (sha256, size), new blob first if there is one
    placements: dict[bytes, ChunkPlacement]
    new_blob: Path | None
    dict_blob_indexes: list[int]  # chunk-dict blob indexes, in new blob-table order
    chunks_new: int
    chunks_from_dict: int
    new_blob_created: bool = False  # False when an identical blob was already in OUT


class Spool:
    """Unique chunk payloads in arrival order, plus lookups into an optional chunk dictionary."""

    def __init__(self, path: Path, chunk_dict: Bootstrap | None = None) -> None:
        self.path = path
        self._f: BinaryIO = open(path, "w+b")  # noqa: SIM115 (closed in close())
        self._entries: dict[bytes, _Spooled] = {}
        self._size = 0
        self._sha = hashlib.sha256()  # of the spool as appended: valid if it becomes the blob
        self._dict = chunk_dict
        self._dict_hits: dict[bytes, int] = {}  # digest -> chunk index in the dictionary

    def has(self, digest: bytes) -> bool:
        """True if the chunk is stored already (spooled, or available from the dictionary).

        Called from worker threads; dict reads race benignly (worst case: one extra compress).
        """
        if digest in self._entries or digest in self._dict_hits:
            return True
        if self._dict is not None:
            rec = self._dict.find_chunk(digest)
            if rec is not None:
                self._dict_hits[digest] = rec.index
                return True
        return False

    def put(self, digest: bytes, payload: bytes, flags: int, uncompressed_size: int) -> None:
        self._f.write(payload)
        self._sha.update(payload)
        self._entries[digest] = _Spooled(self._size, len(payload), uncompressed_size, flags)
        self._size += len(payload)

    def close(self) -> None:
        self._f.close()

    def assemble(self, order: Iterable[bytes], blob_dir: Path) -> AssembledBlobs:
        """Write the new blob with the chunks of ``order`` (first occurrence wins) and place all.

        The blob is named by its sha256, like an OCI layer; the spool file is consumed.
        """
        self._f.flush()
        plan: list[tuple[bytes, _Spooled]] = []
        from_dict: list[tuple[bytes, int]] = []
        seen: set[bytes] = set()
        for d in order:
            if d in seen:
                continue
            seen.add(d)
            e = self._entries.get(d)
            if e is not None:
                plan.append((d, e))
            elif d in self._dict_hits:
                from_dict.append((d, self._dict_hits[d]))
            else:
                raise BuildError(f"chunk {d.hex()} was never stored (builder bug)")

        placements: dict[bytes, ChunkPlacement] = {}
        blobs: list[tuple[bytes, int]] = []
        new_blob: Path | None = None
        created = False
        if plan:
            in_place = all(
                e.offset == off for (_, e), off in zip(plan, _running(plan), strict=True)
            )
            in_place = in_place and sum(e.compressed_size for _, e in plan) == self._size
            if in_place:
                sha, size = self._sha.digest(), self._size
                new_blob = blob_dir / sha.hex()
                created = not new_blob.exists()
                os.replace(self.path, new_blob)
            else:
                sha, size, tmp = self._copy_in_order(plan, blob_dir)
                new_blob = blob_dir / sha.hex()
                created = not new_blob.exists()
                os.replace(tmp, new_blob)
                self.path.unlink()
            blobs.append((sha, size))
            off = 0
            for d, e in plan:
                placements[d] = ChunkPlacement(0, e.flags, off, e.compressed_size,
                                               e.uncompressed_size)
                off += e.compressed_size
        else:
            self.path.unlink()

        dict_blob_indexes: list[int] = []
        if from_dict:
            assert self._dict is not None
            remap: dict[int, int] = {}
            for idx in sorted({self._dict.chunk(ci).blob_index for _, ci in from_dict}):
                remap[idx] = len(blobs)
                b = self._dict.blob(idx)
                blobs.append((b.sha256, b.size))
                dict_blob_indexes.append(idx)
            for d, ci in from_dict:
                rec = self._dict.chunk(ci)
                placements[d] = ChunkPlacement(remap[rec.blob_index], rec.flags,
                                               rec.compressed_offset, rec.compressed_size,
                                               rec.uncompressed_size)
        return AssembledBlobs(blobs, placements, new_blob, dict_blob_indexes, len(plan),
                              len(from_dict), created)

    def _copy_in_order(
        self, plan: list[tuple[bytes, _Spooled]], blob_dir: Path
    ) -> tuple[bytes, int, Path]:
        tmp = blob_dir / f".blob-{os.getpid()}.tmp"
        sha = hashlib.sha256()
        size = 0
        fd = self._f.fileno()
        with open(tmp, "wb") as out:
            for _d, e in plan:
                payload = os.pread(fd, e.compressed_size, e.offset)
                if len(payload) != e.compressed_size:
                    raise BuildError("spool file truncated while building")
                out.write(payload)
                sha.update(payload)
                size += len(payload)
            out.flush()
            os.fsync(out.fileno())
        return sha.digest(), size, tmp


def _running(plan: list[tuple[bytes, _Spooled]]) -> Iterable[int]:
    off = 0
    for _, e in plan:
        yield off
        off += e.compressed_size


# digest, payload (None: already stored), flags, uncompressed size
_Result = tuple[bytes, bytes | None, int, int]

# A small file is read, hashed and compressed entirely by one worker: for trees of many small
# files the main thread would otherwise spend its time in open()/read() while workers idle.
WHOLE_FILE_CHUNKS = 4


class ChunkPipeline:
    """Feed files in; ``node.chunks`` fills in file order; unique payloads land in the spool."""

    def __init__(
        self,
        spool: Spool,
        chunker: Chunker,
        level: int | None,
        workers: int,
        on_bytes: Callable[[int], None] | None = None,
        chunk_size: int = 1 << 20,
    ) -> None:
        self._spool = spool
        self._chunker = chunker
        self._level = level
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="chunk")
        # Each entry: the node, its results, and whether the entry is a whole file.
        self._pending: deque[tuple[Node, Future[list[_Result]], bool]] = deque()
        self._window = 2 * max(1, workers) + 2
        self._whole_file_limit = WHOLE_FILE_CHUNKS * chunk_size
        self._on_bytes = on_bytes
        self.bytes_in = 0
        self.chunks_total = 0
        self.chunks_deduped = 0
        self.bytes_deduped = 0

    def _one(self, data: bytes) -> _Result:
        d = chunk_digest(data)
        if self._spool.has(d):
            return d, None, 0, len(data)
        payload, flags = encode(data, self._level)
        return d, payload, flags, len(data)

    def _work(self, data: bytes) -> list[_Result]:
        return [self._one(data)]

    def _work_file(self, opener: Callable[[], BinaryIO]) -> list[_Result]:
        with opener() as f:
            return [self._one(data) for data in self._chunker.split(f)]

    def _submit(self, node: Node, fut: Future[list[_Result]], whole: bool) -> None:
        self._pending.append((node, fut, whole))
        while len(self._pending) > self._window:
            self._drain_one()

    def add(self, node: Node, stream: BinaryIO) -> int:
        """Chunk one file's stream; returns the bytes read. Stream errors propagate."""
        node.chunks = []
        total = 0
        for data in self._chunker.split(stream):
            total += len(data)
            self.bytes_in += len(data)
            if self._on_bytes is not None:
                self._on_bytes(len(data))
            self._submit(node, self._pool.submit(self._work, data), False)
        return total

    def add_file(self, node: Node, opener: Callable[[], BinaryIO]) -> None:
        """Chunk a file the workers can open themselves (a directory source).

        ``node.size`` becomes the bytes actually read (a file may change while we build);
        errors from ``opener`` or reading surface from ``flush`` or a later ``add*`` call.
        """
        if node.size > self._whole_file_limit:
            with opener() as f:
                node.size = self.add(node, f)
            return
        node.chunks = []
        self._submit(node, self._pool.submit(self._work_file, opener), True)

    def _drain_one(self) -> None:
        node, fut, whole = self._pending.popleft()
        results = fut.result()
        assert node.chunks is not None
        for d, payload, flags, size in results:
            self.chunks_total += 1
            if self._spool.has(d):
                self.chunks_deduped += 1
                self.bytes_deduped += size
            else:
                if payload is None:  # cannot happen: has() only turns true
                    raise BuildError("chunk vanished from the spool (builder bug)")
                self._spool.put(d, payload, flags, size)
            node.chunks.append(d)
        if whole:
            n = sum(r[3] for r in results)
            node.size = n
            self.bytes_in += n
            if self._on_bytes is not None:
                self._on_bytes(n)

    def flush(self) -> None:
        while self._pending:
            self._drain_one()

    def close(self) -> None:
        for _, fut, _whole in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
