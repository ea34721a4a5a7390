"""Bootstrap byte layout, version 1: the single source of truth for every field.

This module is the format layer's bottom: pure ``struct`` definitions, no I/O. ``reader.py`` and
``writer.py`` use only what is defined here, and ``docs/format.md`` mirrors these tables.

All integers are little-endian. A bootstrap is a 256-byte header followed by eight tables, each
8-byte aligned, located by (offset, count) pairs in the header. Records are fixed size so any
record is reached in O(1) without decoding its neighbours: that is what lets a mount open a
bootstrap with millions of inodes in constant time (mmap + bounds-checked ``unpack_from``).

Header (256 bytes)::

    off  size  field
      0     8  magic            b"DFNYDUS\\x00"
      8     4  version          u32, 1
     12     4  header_size      u32, 256
     16     8  flags            u64, bit 0: content-defined chunking (FastCDC)
     24     4  chunk_size       u32, fixed chunk size, or FastCDC average size
     28     1  digest_algo      u8, 1 = blake3-256 (chunk ids and Merkle digests)
     29     1  compression      u8, builder default: 0 = none, 1 = zstd (per-chunk flags rule)
     30     2  reserved         zero
     32     4  root_ino         u32, always 1
     36     4  reserved         zero
     40   128  tables           8 x (offset u64, count u64), in TABLES order below
    168    32  root_digest      Merkle digest of the root directory
    200    32  checksum         blake3 of the whole bootstrap with these 32 bytes zeroed
                                (checked by `check`: covers the header and every table)
    232    24  reserved         zero

Tables (record sizes in bytes)::

    inodes     112  one per inode; inode number N is record N-1; record 0 is the root dir
    dirents     16  all directory entries; each directory's run is sorted by name bytes
    chunkrefs   16  all files' chunk lists; each file's run is ordered by file offset
    chunks      56  unique chunks, sorted by digest (binary search by digest)
    blobs       48  blobs referenced by chunks
    xattrs      24  all extended attributes; each inode's run is sorted by name
    prefetch     4  inode numbers of regular files to fetch first, in order
    strings      1  byte area holding names, symlink targets, xattr names and values

Inode record (112)::

      0  u32 mode          st_mode: file type and permission bits incl. setuid/setgid/sticky
      4  u32 nlink         directories: 2 + subdirectories; others: names in the tree
      8  u32 uid
     12  u32 gid
     16  u64 size          regular: data size; symlink: target length; directory: as built
     24  i64 mtime_sec
     32  u32 mtime_nsec    < 10**9
     36  u32 parent        inode number of the parent directory (root: 1); for a hardlinked
                           file the directory of its first name in traversal order
     40  u64 rdev          Linux makedev() encoding; character and block devices only
     48  u64 data_index    directory: first dirent; regular: first chunkref;
                           symlink: offset of the target in strings; others: 0
     56  u32 data_count    directory: dirents; regular: chunkrefs; symlink: target length
     60  u32 xattr_count
     64  u64 xattr_index   first record in the xattrs table
     72  u64 reserved      zero
     80  32  digest        Merkle digest of this inode (see merkle.py)

Dirent (16)::   0 u64 name_offset (strings)  8 u16 name_len  10 u16 type (mode >> 12)  12 u32 ino
Chunkref (16):: 0 u64 file_offset  8 u32 chunk_index  12 u32 reserved
Chunk (56)::    0 32 digest (blake3 of uncompressed bytes)  32 u32 blob_index  36 u32 flags
                40 u64 compressed_offset  48 u32 compressed_size  52 u32 uncompressed_size
                flags bit 0: payload is a zstd frame (else raw bytes)
Blob (48)::     0 32 sha256 of the blob  32 u64 size  40 u64 reserved
Xattr (24)::    0 u64 name_offset  8 u64 value_offset  16 u32 name_len  20 u32 value_len
Prefetch (4)::  0 u32 ino

Structural invariants (checked by ``Bootstrap.check``): a directory's subdirectories have larger
inode numbers than the directory itself, and every directory except the root is named by
exactly one dirent. Together these make the tree acyclic and let digests be computed in one pass
over inode numbers in reverse.
"""

from __future__ import annotations

import stat
import struct
from typing import Final

import blake3

__all__ = [
    "BLOB",
    "CHECKSUM_OFFSET",
    "CHUNK",
    "CHUNKREF",
    "CHUNK_FLAG_ZSTD",
    "COMPRESSION_NONE",
    "COMPRESSION_ZSTD",
    "DIGEST_BLAKE3",
    "DIGEST_SIZE",
    "DIRENT",
    "FILE_TYPES",
    "FLAG_CDC",
    "HEADER",
    "HEADER_SIZE",
    "INODE",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "MAX_NAME_LEN",
    "MAX_SYMLINK_LEN",
    "MAX_XATTR_NAME_LEN",
    "MAX_XATTR_TOTAL",
    "MAX_XATTR_VALUE_LEN",
    "MIN_CHUNK_SIZE",
    "PREFETCH",
    "RECORD_SIZES",
    "ROOT_INO",
    "TABLES",
    "VERSION",
    "XATTR",
    "bootstrap_checksum",
]

MAGIC: Final = b"DFNYDUS\x00"
VERSION: Final = 1
HEADER_SIZE: Final = 256
ROOT_INO: Final = 1
DIGEST_SIZE: Final = 32

FLAG_CDC: Final = 1 << 0
DIGEST_BLAKE3: Final = 1
COMPRESSION_NONE: Final = 0
COMPRESSION_ZSTD: Final = 1
CHUNK_FLAG_ZSTD: Final = 1 << 0

# Every inode type a container rootfs has; any other S_IFMT value is malformed input.
FILE_TYPES: Final = frozenset(
    {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
     stat.S_IFSOCK}
)

MIN_CHUNK_SIZE: Final = 64 * 1024
MAX_CHUNK_SIZE: Final = 16 * 1024 * 1024
# Linux limits; a longer name or target could never be served by the kernel anyway.
MAX_NAME_LEN: Final = 255
MAX_SYMLINK_LEN: Final = 4095
MAX_XATTR_NAME_LEN: Final = 255
MAX_XATTR_VALUE_LEN: Final = 65536
# All of one inode's xattr names and values together. Values are interned in the string area,
# so without a cap a small bootstrap could make one getxattr read gigabytes.
MAX_XATTR_TOTAL: Final = 256 * 1024

# Header: magic, version, header_size, flags, chunk_size, digest_algo, compression, reserved16,
# root_ino, reserved32, 16 x u64 table descriptors, root_digest, checksum, reserved.
HEADER: Final = struct.Struct("<8sIIQIBBHII16Q32s32s24s")
INODE: Final = struct.Struct("<IIIIQqIIQQIIQQ32s")
DIRENT: Final = struct.Struct("<QHHI")
CHUNKREF: Final = struct.Struct("<QII")
CHUNK: Final = struct.Struct("<32sIIQII")
BLOB: Final = struct.Struct("<32sQQ")
XATTR: Final = struct.Struct("<QQII")
PREFETCH: Final = struct.Struct("<I")

TABLES: Final = (
    "inodes", "dirents", "chunkrefs", "chunks", "blobs", "xattrs", "prefetch", "strings",
)
RECORD_SIZES: Final = {
    "inodes": INODE.size,
    "dirents": DIRENT.size,
    "chunkrefs": CHUNKREF.size,
    "chunks": CHUNK.size,
    "blobs": BLOB.size,
    "xattrs": XATTR.size,
    "prefetch": PREFETCH.size,
    "strings": 1,
}

CHECKSUM_OFFSET: Final = 200


def bootstrap_checksum(data: bytes | bytearray | memoryview) -> bytes:
    """The header checksum of ``data``: blake3 with the checksum field itself zeroed."""
    h = blake3.blake3(memoryview(data)[:CHECKSUM_OFFSET])
    h.update(bytes(DIGEST_SIZE))
    h.update(memoryview(data)[CHECKSUM_OFFSET + DIGEST_SIZE :])
    return h.digest()


assert HEADER.size == HEADER_SIZE
assert INODE.size == 112 and DIRENT.size == 16 and CHUNKREF.size == 16
assert CHUNK.size == 56 and BLOB.size == 48 and XATTR.size == 24
