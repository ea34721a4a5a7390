"""Chunk files and chunk frames: one chunk as it travels between peers and lives in their stores.

A chunk leaves its blob as the blob's *stored payload* (a zstd frame or raw bytes, see
``format.chunk``). Peers keep and send exactly that payload, never a re-encoding, with the
little a receiver needs to decode and verify it on its own: the flags, the uncompressed size
and the digest. The digest in the file is informational (the receiver verifies against the
digest *it asked for*, never against one the sender supplies); it lets a store rebuild its
index from file contents and lets a reader catch a file renamed by mistake.

Chunk file layout (little endian), ``HEADER_SIZE`` = 48 bytes then the payload::

    offset  size  field
    0       4     magic            b"NDCF"
    4       1     version          1
    5       1     flags            CHUNK_FLAG_ZSTD (bit 0) or 0 (raw); other bits must be 0
    6       2     reserved         0
    8       4     uncompressed     size of the decoded chunk, <= MAX_CHUNK_SIZE
    12      4     payload_size     bytes of payload that follow (== file size - 48)
    16      32    digest           blake3-256 of the uncompressed bytes
    48      n     payload          the chunk's payload exactly as stored in its blob

A *batch* of chunks in one HTTP body (a peer's batched upload, the agent's local API when it
sends bytes) is a sequence of frames, in request order, until the end of the body::

    offset  size  field
    0       32    digest           the digest this frame answers
    32      1     status           0 = found (body is a chunk file), 1 = not found, 2 = error,
                                   3 = arriving (a chunk file sent while it still arrives at
                                   the sender; the body may end short: the connection is cut
                                   if the chunk fails on its way there)
    33      4     length           body bytes that follow (little endian)
    37      n     body             a chunk file (status 0) or a UTF-8 message (1, 2)

Everything here is pure bytes in, bytes out (no I/O). :func:`unpack` checks structure only;
:func:`unpack_verified` also decodes and checks the digest and is what every receiver calls:
bytes from a peer are untrusted input.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from nydusfs.errors import IntegrityError
from nydusfs.format.chunk import decode, verify
from nydusfs.format.layout import CHUNK_FLAG_ZSTD, MAX_CHUNK_SIZE

__all__ = [
    "FRAME_ARRIVING",
    "FRAME_ERROR",
    "FRAME_FOUND",
    "FRAME_HEADER_SIZE",
    "FRAME_NOT_FOUND",
    "HEADER_SIZE",
    "MAGIC",
    "ChunkFile",
    "Frame",
    "check_verified",
    "frame_header",
    "header",
    "iter_frames",
    "pack",
    "pack_frame",
    "parse_frame_header",
    "unpack",
    "unpack_verified",
]

MAGIC = b"NDCF"
VERSION = 1
_HEADER = struct.Struct("<4sBBHII32s")
HEADER_SIZE = _HEADER.size  # 48
_FRAME = struct.Struct("<32sBI")
FRAME_HEADER_SIZE = _FRAME.size  # 37
FRAME_FOUND, FRAME_NOT_FOUND, FRAME_ERROR, FRAME_ARRIVING = 0, 1, 2, 3
# A frame body is a chunk file or a short message; anything longer is hostile.
MAX_FRAME_BODY = HEADER_SIZE + MAX_CHUNK_SIZE + (MAX_CHUNK_SIZE >> 4)


@dataclass(frozen=True, slots=True)
class ChunkFile:
    """A structurally valid chunk file (not yet verified against any digest)."""

    flags: int
    uncompressed_size: int
    digest: bytes
    payload: bytes | memoryview


def pack(payload: bytes | memoryview, flags: int, uncompressed_size: int,
         digest: bytes) -> bytes:
    """The chunk file for a payload (raises ``ValueError`` for values no chunk can have)."""
    return header(len(payload), flags, uncompressed_size, digest) + bytes(payload)


def header(payload_size: int, flags: int, uncompressed_size: int, digest: bytes) -> bytes:
    """A chunk file's header alone (a node writes it before the payload streams in);
    ``ValueError`` for values no chunk can have."""
    if flags & ~CHUNK_FLAG_ZSTD or not 0 <= uncompressed_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk flags {flags:#x} / size {uncompressed_size} out of range")
    if len(digest) != 32:
        raise ValueError("digest must be 32 bytes")
    return _HEADER.pack(MAGIC, VERSION, flags, 0, uncompressed_size, payload_size, digest)


def unpack(data: bytes | memoryview, digest: bytes | None = None) -> ChunkFile:
    """Parse a chunk file; ``IntegrityError`` if it is not one (or names another ``digest``).

    Structure only: the payload is not decoded. Cheap enough for a server to call before it
    sends a stored file.
    """
    view = memoryview(data)
    name = digest.hex() if digest is not None else "chunk file"
    if len(view) < HEADER_SIZE:
        raise IntegrityError(f"{name}: chunk file truncated ({len(view)} bytes)")
    magic, version, flags, reserved, usize, psize, file_digest = _HEADER.unpack_from(view)
    if magic != MAGIC or version != VERSION or reserved:
        raise IntegrityError(f"{name}: not a chunk file (magic {magic!r}, version {version})")
    if flags & ~CHUNK_FLAG_ZSTD:
        raise IntegrityError(f"{name}: unknown chunk flags {flags:#x}")
    if usize > MAX_CHUNK_SIZE:
        raise IntegrityError(f"{name}: uncompressed size {usize} exceeds the limit")
    if psize != len(view) - HEADER_SIZE:
        raise IntegrityError(f"{name}: payload size {psize} but {len(view) - HEADER_SIZE} "
                             "bytes follow the header")
    if not flags & CHUNK_FLAG_ZSTD and psize != usize:
        raise IntegrityError(f"{name}: raw chunk with payload {psize} != size {usize}")
    if digest is not None and file_digest != digest:
        raise IntegrityError(f"{name}: the file holds chunk {file_digest.hex()}")
    return ChunkFile(flags, usize, file_digest, view[HEADER_SIZE:])


def unpack_verified(data: bytes | memoryview, digest: bytes,
                    uncompressed_size: int | None = None) -> bytes:
    """The decoded chunk ``digest`` from a chunk file, or ``IntegrityError``.

    Decodes the payload and checks its blake3 against ``digest`` (the digest the caller asked
    for, not the one in the file), and its size against ``uncompressed_size`` when given.
    Never returns wrong bytes.
    """
    cf = _unpack_sized(data, digest, uncompressed_size)
    return decode(cf.payload, cf.flags, cf.uncompressed_size, digest)


def check_verified(data: bytes | memoryview, digest: bytes,
                   uncompressed_size: int | None = None) -> None:
    """:func:`unpack_verified` for a receiver that keeps the chunk file, not the decoded
    chunk: the same checks, no copy of a raw payload (``format.chunk.verify``)."""
    cf = _unpack_sized(data, digest, uncompressed_size)
    verify(cf.payload, cf.flags, cf.uncompressed_size, digest)


def _unpack_sized(data: bytes | memoryview, digest: bytes,
                  uncompressed_size: int | None) -> ChunkFile:
    cf = unpack(data, digest)
    if uncompressed_size is not None and cf.uncompressed_size != uncompressed_size:
        raise IntegrityError(f"{digest.hex()}: chunk file says {cf.uncompressed_size} bytes, "
                             f"expected {uncompressed_size}")
    return cf


@dataclass(frozen=True, slots=True)
class Frame:
    digest: bytes
    status: int  # FRAME_FOUND | FRAME_NOT_FOUND | FRAME_ERROR | FRAME_ARRIVING
    body: bytes | memoryview  # a chunk file (found) or a UTF-8 message

    @property
    def message(self) -> str:
        return bytes(self.body).decode("utf-8", "replace")


def pack_frame(digest: bytes, status: int, body: bytes | memoryview = b"") -> bytes:
    """One frame's header followed by its body."""
    return _FRAME.pack(digest, status, len(body)) + bytes(body)


def frame_header(digest: bytes, status: int, length: int) -> bytes:
    """A frame header alone (a server streams the body after it)."""
    return _FRAME.pack(digest, status, length)


def parse_frame_header(header: bytes) -> tuple[bytes, int, int]:
    """``(digest, status, length)`` of a frame header; ``IntegrityError`` if it is malformed.

    For readers that stream a batch (read the header, then exactly ``length`` bytes).
    """
    if len(header) != FRAME_HEADER_SIZE:
        raise IntegrityError("chunk batch: truncated frame header")
    digest, status, length = _FRAME.unpack(header)
    if status not in (FRAME_FOUND, FRAME_NOT_FOUND, FRAME_ERROR, FRAME_ARRIVING) or \
            length > MAX_FRAME_BODY:
        raise IntegrityError(f"chunk batch: bad frame (status {status}, length {length})")
    return digest, status, length


def iter_frames(data: bytes | memoryview) -> Iterator[Frame]:
    """The frames of a complete batch body; ``IntegrityError`` at the first malformed one."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        if len(view) - pos < FRAME_HEADER_SIZE:
            raise IntegrityError(f"chunk batch: truncated frame header at byte {pos}")
        digest, status, length = parse_frame_header(bytes(view[pos:pos + FRAME_HEADER_SIZE]))
        pos += FRAME_HEADER_SIZE
        if len(view) - pos < length:
            raise IntegrityError(f"chunk batch: frame for {digest.hex()} truncated")
        yield Frame(digest, status, view[pos:pos + length])
        pos += length
