"""Decoded bootstrap records: small immutable value types, the format's vocabulary.

Pure data, no I/O. The reader produces them after validating the bytes they came from; the
builder produces the writer's inputs from them. Digests are raw 32-byte ``bytes``; helpers give
the hex forms users see.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

from nydusfs.format.layout import FLAG_CDC

__all__ = [
    "BlobRecord",
    "ChunkRecord",
    "ChunkRef",
    "Dirent",
    "Header",
    "Inode",
    "Listing",
    "Xattr",
]


@dataclass(frozen=True, slots=True)
class Header:
    """The bootstrap header: build parameters, table locations and the two whole-file digests."""

    version: int
    flags: int
    chunk_size: int
    digest_algo: int
    compression: int
    root_ino: int
    tables: dict[str, tuple[int, int]]
    root_digest: bytes
    checksum: bytes

    @property
    def cdc(self) -> bool:
        """True when files were cut by FastCDC (chunk_size is then the average)."""
        return bool(self.flags & FLAG_CDC)

    def count(self, table: str) -> int:
        """Number of records (bytes, for ``strings``) in ``table``."""
        return self.tables[table][1]


# Inode and Dirent are decoded on every lookup and readdir entry, so they are plain slotted
# dataclasses: a frozen one costs ~7x more to construct (measured: 1.7 vs 0.23 us). Treat them
# as read-only all the same.
@dataclass(slots=True, eq=True)
class Inode:
    """One inode's attributes and the location of its type-specific data."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_sec: int
    mtime_nsec: int
    parent: int
    rdev: int
    data_index: int
    data_count: int
    xattr_count: int
    xattr_index: int
    digest: bytes

    @property
    def mtime_ns(self) -> int:
        return self.mtime_sec * 1_000_000_000 + self.mtime_nsec

    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


@dataclass(slots=True, eq=True)
class Dirent:
    """A name in a directory; ``type`` is the file-type nibble (``mode >> 12``) for readdir."""

    name: bytes
    type: int
    ino: int


@dataclass(slots=True, eq=True)
class Listing:
    """Entries of a directory, in order, as three parallel lists: name, inode number, st_mode.

    Lists of bytes and ints rather than an object per entry: a mount keeps recent listings in
    memory, and a hundred thousand small tuples or dataclasses there would make every pass of
    Python's garbage collector walk them (it tracks containers, not bytes or ints).
    """

    names: list[bytes]
    inos: list[int]
    modes: list[int]

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """A unique chunk: where its payload lies in which blob, and what it decodes to."""

    index: int
    digest: bytes
    blob_index: int
    flags: int
    compressed_offset: int
    compressed_size: int
    uncompressed_size: int

    @property
    def hex(self) -> str:
        return self.digest.hex()


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One chunk of a file at a file offset."""

    file_offset: int
    chunk: ChunkRecord


@dataclass(frozen=True, slots=True)
class BlobRecord:
    """A blob the image's chunks live in, named (like an OCI layer) by its sha256."""

    index: int
    sha256: bytes
    size: int

    @property
    def hex(self) -> str:
        return self.sha256.hex()

    @property
    def oci_digest(self) -> str:
        return "sha256:" + self.sha256.hex()


@dataclass(frozen=True, slots=True)
class Xattr:
    name: bytes
    value: bytes = field(repr=False)
