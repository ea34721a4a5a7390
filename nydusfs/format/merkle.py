"""Merkle digests of inodes: what makes a tree's identity independent of how it was built.

A node's digest is blake3-256 over a canonical encoding of what a reader can observe, never over
inode numbers, table positions, blob placement or build time::

    attrs    = u32 mode, u32 uid, u32 gid, u32 nlink*, u64 size*, i64 mtime_sec, u32 mtime_nsec,
               u64 rdev
    xattrs   = u32 count, then per xattr in byte order of names:
               u32 len(name), name, u32 len(value), value
    payload  = regular:   u64 count, then each chunk digest (32 bytes) in file order
               symlink:   u32 len(target), target
               directory: u64 count, then per entry in byte order of names:
                          u32 len(name), name, child digest (32 bytes)
               other:     nothing
    digest   = blake3(b"dfnydus-merkle-v1\\0" + attrs + xattrs + payload)

``*`` For directories nlink and size are encoded as 0: both depend on the filesystem the tree
was read from (ext4 reports 4096, tmpfs a multiple of entries), not on its content, and nlink is
derived from the children, which the payload already covers.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Iterable, Sequence

import blake3

__all__ = ["node_digest"]

_PREFIX = b"dfnydus-merkle-v1\x00"
_ATTRS = struct.Struct("<IIIIQqIQ")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def node_digest(
    *,
    mode: int,
    uid: int,
    gid: int,
    nlink: int,
    size: int,
    mtime_sec: int,
    mtime_nsec: int,
    rdev: int,
    xattrs: Iterable[tuple[bytes, bytes]],
    chunk_digests: Sequence[bytes] = (),
    symlink_target: bytes = b"",
    children: Sequence[tuple[bytes, bytes]] = (),
) -> bytes:
    """Digest of one inode; ``children`` are (name, child digest) pairs, in any order."""
    h = blake3.blake3(_PREFIX)
    is_dir = stat.S_ISDIR(mode)
    h.update(
        _ATTRS.pack(
            mode, uid, gid, 0 if is_dir else nlink, 0 if is_dir else size,
            mtime_sec, mtime_nsec, rdev,
        )
    )
    items = sorted(xattrs)
    h.update(_U32.pack(len(items)))
    for name, value in items:
        h.update(_U32.pack(len(name)) + name + _U32.pack(len(value)))
        h.update(value)
    if stat.S_ISREG(mode):
        h.update(_U64.pack(len(chunk_digests)))
        for d in chunk_digests:
            h.update(d)
    elif stat.S_ISLNK(mode):
        h.update(_U32.pack(len(symlink_target)) + symlink_target)
    elif is_dir:
        h.update(_U64.pack(len(children)))
        for name, d in sorted(children):
            h.update(_U32.pack(len(name)) + name + d)
    return h.digest()
