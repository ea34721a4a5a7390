"""The storage interface: byte ranges of blobs, from wherever the image's blobs live.

Backends are chosen by name (``localfs`` now; ``registry``, ``s3`` and ``dragonfly`` in later
issues) and all speak this one async interface, so the filesystem, the prefetcher and the P2P
agent never care where bytes come from. Backends return raw payload bytes; they never decode or
verify chunks — verification happens once, above them, in ``format.chunk.decode``.

Contract for every implementation (the conformance suite in tests/storage checks it):

- ``read(blob, offset, size)`` returns exactly ``size`` bytes of blob ``blob`` (sha256 hex)
  starting at ``offset``, or raises:
  - ``NotFoundError`` if the blob does not exist, or the range lies outside it (final);
  - ``UnavailableError`` for transient failures: timeouts, refused connections, server errors,
    local I/O errors (the retry wrapper retries these, with backoff);
  - never a foreign exception (``OSError``, ``aiohttp.ClientError`` ...): translate at the call.
- ``read_many(requests)`` is the batched form: results in request order, same errors. The
  default implementation issues the reads concurrently; backends with a cheaper batched form
  (HTTP multi-range, one S3 GET spanning neighbours) override it.
- ``stream_many(requests, sink)`` reads the same ranges but hands their bytes to
  ``sink(index, position, data)`` as they arrive (``position`` within request ``index``'s
  range, in order; a retried read starts again at 0, so a sink skips what it has), returning
  nothing. Same errors. The default calls ``read_many`` and hands over each whole range; the
  registry backend streams its GETs, so the P2P agent can pass a chunk on to peers while it
  still arrives from the registry (``dfagent.peer.arrival``).
- ``close()`` releases connections and file handles; a closed backend is not used again
  (reading from one raises ``UnavailableError``, never returns bytes). ``close()`` is idempotent.

Details every backend follows the same way, so layers above can rely on them:

- A blob name that is not 64 lowercase hex digits is ``NotFoundError``: no backend may turn a
  name into a path, key or URL before :func:`check_range` accepted it (no ``../`` tricks).
- A negative offset or size is ``NotFoundError`` (the range lies outside every blob). A
  zero-size read at ``offset <= blob size`` returns ``b""``; beyond the end it is not found.
- Overlapping or repeated ranges in one ``read_many`` are fine; each gets its own bytes.
- ``IntegrityError`` is never raised by a backend itself (they do not verify); a verifying layer
  above raises it, and the retry wrapper never retries it.

Chunk-aware backends: a request for exactly one chunk may carry that chunk's identity
(:class:`ChunkInfo`: digest, flags, uncompressed size; the range is its compressed extent).
Byte-range backends ignore it. A backend that serves chunks by digest rather than byte ranges
(``dragonfly``, the P2P agent) sets ``per_chunk = True``: the filesystem then never merges
neighbouring chunks into one request, so every request it sends carries its ``chunk``. The
reply is still the chunk's payload as stored in the blob (what ``format.chunk.decode`` takes).

Node-level stores: a backend that keeps what it fetches in a store shared by the node (the P2P
agent's chunk store, the node's only on-disk cache with ``dragonfly``) sets ``warms = True``
and implements :meth:`Backend.warm`: have chunks in that store without delivering their bytes.
A whole-image prefetch then costs the mount nothing per byte: reading, decoding and verifying
every chunk only to drop the bytes (prefetch keeps nothing in memory) would double the node's
CPU per byte, while the store verified each chunk as it arrived and every later read is
verified again by the filesystem.
"""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nydusfs.errors import NotFoundError

__all__ = ["Backend", "ChunkInfo", "RangeRequest", "Sink", "check_range"]

_BLOB_NAME = re.compile(r"[0-9a-f]{64}")


def check_range(blob: str, offset: int, size: int) -> None:
    """Raise ``NotFoundError`` unless ``blob`` is a sha256 hex name and the range is non-negative.

    Called by every backend before the name reaches a path, key or URL: blob names come from the
    bootstrap, which is untrusted input, so validation happens where they enter storage.
    """
    if not (isinstance(blob, str) and _BLOB_NAME.fullmatch(blob)):
        raise NotFoundError(f"{blob!r}: not a blob name (64 lowercase hex digits)")
    if offset < 0 or size < 0:
        raise NotFoundError(f"{blob}: invalid range offset={offset} size={size}")


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """The chunk a single-chunk request is for (the range is its compressed extent)."""

    digest: bytes  # blake3 of the uncompressed bytes
    flags: int  # CHUNK_FLAG_ZSTD or 0: how the payload is encoded in the blob
    uncompressed_size: int


@dataclass(frozen=True, slots=True)
class RangeRequest:
    blob: str  # sha256 hex of the blob
    offset: int
    size: int
    chunk: ChunkInfo | None = None  # set when the range is exactly one chunk


# ``stream_many``'s receiver: (request index, position within its range, bytes).
Sink = Callable[[int, int, bytes], None]


class Backend(ABC):
    """Reads byte ranges of blobs. See the module docstring for the error contract."""

    name: str = "backend"
    # True: the backend wants one request per chunk, each with its ``chunk`` (see module doc).
    per_chunk: bool = False
    # True: ``warm`` puts chunks in a node-level store without delivering them (module doc).
    warms: bool = False

    @abstractmethod
    async def read(self, blob: str, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes of ``blob`` from ``offset``."""

    async def read_many(self, requests: Sequence[RangeRequest]) -> list[bytes]:
        """Several ranges, results in request order."""
        return list(await asyncio.gather(*(self.read(r.blob, r.offset, r.size)
                                           for r in requests)))

    async def stream_many(self, requests: Sequence[RangeRequest], sink: Sink) -> None:
        """The ranges' bytes to ``sink`` as they arrive (module doc); whole ranges here."""
        for i, data in enumerate(await self.read_many(requests)):
            sink(i, 0, data)

    async def warm(self, requests: Sequence[RangeRequest]) -> list[bool]:
        """Have each chunk in the node-level store, bytes not delivered; per request, whether
        it is there now. ``False`` means "read it instead" (no store, the store could not get
        it, or the request carries no ``chunk``): never an error for a chunk alone."""
        return [False] * len(requests)

    async def close(self) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Release resources."""
