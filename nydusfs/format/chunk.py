"""Chunk codec: uncompressed bytes <-> blob payload, with the digest check on every decode.

A chunk's identity is ``blake3(uncompressed bytes)``. Its payload in a blob is either a single
zstd frame (``CHUNK_FLAG_ZSTD``) or the raw bytes, whichever is smaller, so every chunk decodes
on its own from a ranged read. ``decode`` is the only way bytes leave a blob: it bounds the
decompressed size before decompressing (a hostile frame cannot balloon memory) and refuses to
return bytes whose digest differs. This layer never does I/O.
"""

from __future__ import annotations

import threading

import blake3
import zstandard

from nydusfs.errors import IntegrityError
from nydusfs.format.layout import CHUNK_FLAG_ZSTD, MAX_CHUNK_SIZE

__all__ = ["DEFAULT_ZSTD_LEVEL", "chunk_digest", "decode", "encode"]

DEFAULT_ZSTD_LEVEL = 3

# zstd contexts are not thread safe; one per thread, per level, reused across chunks (creating a
# context per chunk costs more than compressing a small chunk).
_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    comp = cache.get(level)
    if comp is None:
        # No frame checksum: blake3 over the output already covers it. Content size is written
        # so a reader can check it against the chunk record before decompressing.
        comp = cache[level] = zstandard.ZstdCompressor(
            level=level, write_checksum=False, write_content_size=True
        )
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if dec is None:
        dec = _local.decompressor = zstandard.ZstdDecompressor()
    return dec


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The chunk id: blake3-256 of the uncompressed bytes."""
    return blake3.blake3(data).digest()


def encode(
    data: bytes | memoryview, level: int | None = DEFAULT_ZSTD_LEVEL
) -> tuple[bytes, int]:
    """Return ``(payload, flags)``; raw when ``level`` is None or zstd does not save space."""
    if level is not None and len(data) > 0:
        packed = _compressor(level).compress(data)
        if len(packed) < len(data):
            return packed, CHUNK_FLAG_ZSTD
    return bytes(data), 0


def decode(
    payload: bytes | memoryview, flags: int, uncompressed_size: int, digest: bytes
) -> bytes:
    """Decode one chunk payload and verify it against ``digest``.

    Raises ``IntegrityError`` for anything that does not yield exactly the bytes named by
    ``digest``: an undecodable frame, a wrong size, a digest mismatch. Never returns wrong bytes.
    """
    data = _checked(payload, flags, uncompressed_size, digest)
    return data if isinstance(data, bytes) else bytes(data)


def verify(payload: bytes | memoryview, flags: int, uncompressed_size: int,
           digest: bytes) -> None:
    """:func:`decode`'s checks without its result: a raw payload is hashed where it lies, not
    copied first (a 1 MiB copy per chunk was ~3% of a busy P2P peer's Python time, which only
    verifies what it stores and passes on)."""
    _checked(payload, flags, uncompressed_size, digest)


def _checked(payload: bytes | memoryview, flags: int, uncompressed_size: int,
             digest: bytes) -> bytes | memoryview:
    """The decoded chunk, verified (a raw payload as given: a view stays a view)."""
    if not 0 <= uncompressed_size <= MAX_CHUNK_SIZE:
        raise IntegrityError(f"chunk {digest.hex()}: size {uncompressed_size} exceeds the limit")
    if flags & CHUNK_FLAG_ZSTD:
        # python-zstandard sizes its output from the frame header and ignores max_output_size
        # when the header declares a content size, so check the declaration first: a hostile
        # frame must not make us allocate more than the chunk record allows. (A frame without
        # a declared size is bounded by max_output_size; ours always declare it.)
        try:
            declared = zstandard.frame_content_size(payload)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"chunk {digest.hex()}: bad zstd frame: {exc}") from exc
        if declared not in (uncompressed_size, -1):  # -1: the frame does not say
            raise IntegrityError(
                f"chunk {digest.hex()}: frame declares {declared} bytes, "
                f"expected {uncompressed_size}"
            )
        data: bytes | memoryview
        try:
            # (max_output_size=0 would mean "unlimited": an empty chunk is not decompressed.)
            data = (_decompressor().decompress(payload, max_output_size=uncompressed_size)
                    if uncompressed_size else b"")
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"chunk {digest.hex()}: bad zstd frame: {exc}") from exc
    else:
        data = payload
    if len(data) != uncompressed_size:
        raise IntegrityError(
            f"chunk {digest.hex()}: decoded {len(data)} bytes, expected {uncompressed_size}"
        )
    if blake3.blake3(data).digest() != digest:
        raise IntegrityError(f"chunk {digest.hex()}: digest mismatch")
    return data
