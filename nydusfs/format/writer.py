"""Serialize a flattened tree into a bootstrap (the inverse of ``reader.py``).

The builder hands over inodes already numbered (index 0 is inode 1, the root), each file's chunk
digests, and where each unique chunk was placed. The writer owns everything derived: nlink, the
sorted dirent and chunk tables, string interning, Merkle digests and the header. Output is a
pure function of the inputs, which is what makes builds reproducible.

No I/O beyond writing the finished bytes; inputs are checked (names, lengths, sizes) so a builder
bug or an unrepresentable source entry becomes a ``BuildError``, not a bootstrap ``check`` rejects.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from nydusfs.errors import BuildError
from nydusfs.format import layout as L
from nydusfs.format.merkle import node_digest

__all__ = ["BootstrapParams", "ChunkPlacement", "InodeSpec", "write_bootstrap"]


@dataclass(slots=True)
class InodeSpec:
    """One inode as the builder describes it. Inode number = position in the list + 1."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime_sec: int = 0
    mtime_nsec: int = 0
    rdev: int = 0
    size: int = 0  # directories: reported size; regular: must equal the chunks' total
    parent: int = L.ROOT_INO
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    target: bytes = b""  # symlink target
    children: list[tuple[bytes, int]] = field(default_factory=list)  # (name, ino), any order
    chunks: list[bytes] = field(default_factory=list)  # chunk digests in file order


@dataclass(frozen=True, slots=True)
class ChunkPlacement:
    """Where a unique chunk's payload lives."""

    blob_index: int
    flags: int
    compressed_offset: int
    compressed_size: int
    uncompressed_size: int


@dataclass(frozen=True, slots=True)
class BootstrapParams:
    chunk_size: int
    cdc: bool = False
    compression: int = L.COMPRESSION_ZSTD


class _Strings:
    """The string area, interning repeated names (``__init__.py``, ``security.capability``)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self._seen: dict[bytes, int] = {}

    def add(self, s: bytes) -> int:
        off = self._seen.get(s)
        if off is None:
            off = self._seen[s] = len(self.buf)
            self.buf += s
        return off


def _check_name(name: bytes, where: str) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\x00" in name:
        raise BuildError(f"{where}: invalid file name {name!r}")
    if len(name) > L.MAX_NAME_LEN:
        raise BuildError(f"{where}: name longer than {L.MAX_NAME_LEN} bytes: {name[:40]!r}...")


def write_bootstrap(
    out: BinaryIO,
    inodes: Sequence[InodeSpec],
    chunks: Mapping[bytes, ChunkPlacement],
    blobs: Sequence[tuple[bytes, int]],
    prefetch: Sequence[int],
    params: BootstrapParams,
) -> bytes:
    """Write the bootstrap to ``out`` and return the root Merkle digest.

    Raises ``BuildError`` for any input the reader's ``check()`` would reject.
    """
    _validate(inodes, chunks, blobs, params)
    n = len(inodes)

    # nlink: directories 2 + subdirectories; everything else, the names pointing at it.
    nlink = [0] * (n + 1)
    for i, spec in enumerate(inodes, start=1):
        if stat.S_ISDIR(spec.mode):
            nlink[i] += 2
        for name, child in spec.children:
            if stat.S_ISDIR(inodes[child - 1].mode):
                if child <= i:
                    raise BuildError(f"inode {i}: subdirectory {name!r} must have a larger ino")
                nlink[i] += 1
            else:
                nlink[child] += 1

    # Chunk table, sorted by digest so readers can binary-search it (chunk dict, P2P lookups).
    order = sorted(chunks)
    chunk_index = {d: i for i, d in enumerate(order)}
    chunk_tab = bytearray()
    for d in order:
        p = chunks[d]
        chunk_tab += L.CHUNK.pack(
            d, p.blob_index, p.flags, p.compressed_offset, p.compressed_size, p.uncompressed_size
        )

    strings = _Strings()
    dirent_tab = bytearray()
    chunkref_tab = bytearray()
    xattr_tab = bytearray()
    inode_tab = bytearray()
    digests: list[bytes] = [b""] * (n + 1)
    n_dirents = n_chunkrefs = n_xattrs = 0

    # Merkle digests: non-directories first, then directories in reverse inode order (a
    # directory's subdirectories always have larger numbers, so they are done by then).
    for i, spec in enumerate(inodes, start=1):
        if stat.S_ISDIR(spec.mode):
            continue
        if stat.S_ISREG(spec.mode):
            total = 0
            for d in spec.chunks:
                if d not in chunk_index:
                    raise BuildError(f"inode {i}: chunk {d.hex()} has no placement")
                total += chunks[d].uncompressed_size
            if total != spec.size:
                raise BuildError(f"inode {i}: size {spec.size} but chunks hold {total} bytes")
        elif stat.S_ISLNK(spec.mode):
            if not 0 < len(spec.target) <= L.MAX_SYMLINK_LEN or b"\x00" in spec.target:
                raise BuildError(f"inode {i}: invalid symlink target {spec.target[:40]!r}")
            spec.size = len(spec.target)
        digests[i] = _digest(spec, nlink[i], spec.chunks, [])
    for i in range(n, 0, -1):
        spec = inodes[i - 1]
        if stat.S_ISDIR(spec.mode):
            kids = [(name, digests[c]) for name, c in spec.children]
            digests[i] = _digest(spec, nlink[i], [], kids)

    for i, spec in enumerate(inodes, start=1):
        data_index = data_count = 0
        if stat.S_ISDIR(spec.mode):
            entries = sorted(spec.children)
            data_index, data_count = n_dirents, len(entries)
            prev: bytes | None = None
            for name, child in entries:
                _check_name(name, f"inode {i}")
                if name == prev:
                    raise BuildError(f"inode {i}: duplicate entry {name!r}")
                prev = name
                ftype = inodes[child - 1].mode >> 12
                dirent_tab += L.DIRENT.pack(strings.add(name), len(name), ftype, child)
            n_dirents += len(entries)
        elif stat.S_ISREG(spec.mode):
            data_index, data_count = n_chunkrefs, len(spec.chunks)
            off = 0
            for d in spec.chunks:
                chunkref_tab += L.CHUNKREF.pack(off, chunk_index[d], 0)
                off += chunks[d].uncompressed_size
            n_chunkrefs += len(spec.chunks)
        elif stat.S_ISLNK(spec.mode):
            data_index, data_count = strings.add(spec.target), len(spec.target)
        if sum(len(k) + len(v) for k, v in spec.xattrs.items()) > L.MAX_XATTR_TOTAL:
            raise BuildError(f"inode {i}: xattrs exceed {L.MAX_XATTR_TOTAL} bytes in all")
        xattr_index = n_xattrs
        for name, value in sorted(spec.xattrs.items()):
            if not 0 < len(name) <= L.MAX_XATTR_NAME_LEN or len(value) > L.MAX_XATTR_VALUE_LEN:
                raise BuildError(f"inode {i}: xattr {name[:40]!r} too long")
            xattr_tab += L.XATTR.pack(strings.add(name), strings.add(value), len(name), len(value))
        n_xattrs += len(spec.xattrs)
        _check_u32(i, uid=spec.uid, gid=spec.gid, parent=spec.parent, nsec=spec.mtime_nsec)
        if spec.mtime_nsec >= 1_000_000_000:
            raise BuildError(f"inode {i}: mtime nanoseconds out of range")
        try:
            inode_tab += L.INODE.pack(
                spec.mode, nlink[i], spec.uid, spec.gid, spec.size, spec.mtime_sec,
                spec.mtime_nsec, spec.parent, spec.rdev, data_index, data_count,
                len(spec.xattrs), xattr_index, 0, digests[i],
            )
        except struct.error as exc:
            raise BuildError(f"inode {i}: attribute out of range: {exc}") from exc

    prefetch_tab = bytearray()
    for ino in prefetch:
        if not 1 <= ino <= n or not stat.S_ISREG(inodes[ino - 1].mode):
            raise BuildError(f"prefetch: inode {ino} is not a regular file")
        prefetch_tab += L.PREFETCH.pack(ino)

    blob_tab = bytearray()
    for sha, size in blobs:
        blob_tab += L.BLOB.pack(sha, size, 0)

    tables = {
        "inodes": (inode_tab, n),
        "dirents": (dirent_tab, n_dirents),
        "chunkrefs": (chunkref_tab, n_chunkrefs),
        "chunks": (chunk_tab, len(order)),
        "blobs": (blob_tab, len(blobs)),
        "xattrs": (xattr_tab, n_xattrs),
        "prefetch": (prefetch_tab, len(prefetch)),
        "strings": (strings.buf, len(strings.buf)),
    }
    body = bytearray()
    descriptors: list[int] = []
    for table in L.TABLES:
        data, count = tables[table]
        body += b"\x00" * (-len(body) % 8)  # 8-byte alignment (the header is 256 bytes)
        descriptors += [L.HEADER_SIZE + len(body), count]
        body += data
    body += b"\x00" * (-len(body) % 8)
    data = bytearray(L.HEADER.pack(
        L.MAGIC, L.VERSION, L.HEADER_SIZE, L.FLAG_CDC if params.cdc else 0, params.chunk_size,
        L.DIGEST_BLAKE3, params.compression, 0, L.ROOT_INO, 0, *descriptors,
        digests[L.ROOT_INO], b"", b"",
    ))
    data += body
    data[L.CHECKSUM_OFFSET : L.CHECKSUM_OFFSET + L.DIGEST_SIZE] = L.bootstrap_checksum(data)
    out.write(data)
    return digests[L.ROOT_INO]


_U64 = 1 << 64


def _validate(
    inodes: Sequence[InodeSpec],
    chunks: Mapping[bytes, ChunkPlacement],
    blobs: Sequence[tuple[bytes, int]],
    params: BootstrapParams,
) -> None:
    """Reject, before anything is packed, every input the reader would refuse."""
    n = len(inodes)
    if n == 0 or not stat.S_ISDIR(inodes[0].mode):
        raise BuildError("the root inode must be a directory")
    if n > 0xFFFFFFFF:
        raise BuildError("too many inodes")
    cs = params.chunk_size
    if cs & (cs - 1) or not L.MIN_CHUNK_SIZE <= cs <= L.MAX_CHUNK_SIZE:
        raise BuildError(f"chunk size {cs} is not a power of two from 64K to 16M")
    if params.compression not in (L.COMPRESSION_NONE, L.COMPRESSION_ZSTD):
        raise BuildError(f"unknown compression {params.compression}")
    for i, (sha, size) in enumerate(blobs):
        if len(sha) != L.DIGEST_SIZE or not 0 <= size < _U64:
            raise BuildError(f"blob {i}: bad sha256 or size")
    for d, p in chunks.items():
        where = f"chunk {d.hex()}"
        if len(d) != L.DIGEST_SIZE or not 0 <= p.blob_index < len(blobs):
            raise BuildError(f"{where}: bad digest or blob index")
        if p.flags & ~L.CHUNK_FLAG_ZSTD:
            raise BuildError(f"{where}: unknown flags {p.flags:#x}")
        if not 0 < p.uncompressed_size <= L.MAX_CHUNK_SIZE or not 0 < p.compressed_size < 1 << 32:
            raise BuildError(f"{where}: bad size {p.compressed_size}/{p.uncompressed_size}")
        if not p.flags & L.CHUNK_FLAG_ZSTD and p.compressed_size != p.uncompressed_size:
            raise BuildError(f"{where}: raw chunk with differing sizes")
        end = p.compressed_offset + p.compressed_size
        if p.compressed_offset < 0 or end > blobs[p.blob_index][1]:
            raise BuildError(f"{where}: extent outside blob {p.blob_index}")

    named_by: list[list[int]] = [[] for _ in range(n + 1)]
    for i, spec in enumerate(inodes, start=1):
        if not 0 <= spec.mode <= 0o177777 or stat.S_IFMT(spec.mode) not in L.FILE_TYPES:
            raise BuildError(f"inode {i}: bad mode {spec.mode:#o}")
        fmt = stat.S_IFMT(spec.mode)
        _check_u32(i, uid=spec.uid, gid=spec.gid)
        if not 1 <= spec.parent <= n:
            raise BuildError(f"inode {i}: parent {spec.parent} out of range")
        if not 0 <= spec.mtime_nsec < 1_000_000_000 or not -(1 << 63) <= spec.mtime_sec < 1 << 63:
            raise BuildError(f"inode {i}: mtime out of range")
        if not 0 <= spec.rdev < _U64 or not 0 <= spec.size < _U64:
            raise BuildError(f"inode {i}: rdev or size out of range")
        if spec.children and fmt != stat.S_IFDIR:
            raise BuildError(f"inode {i}: only directories have entries")
        if spec.chunks and fmt != stat.S_IFREG:
            raise BuildError(f"inode {i}: only regular files have chunks")
        for name, child in spec.children:
            if not 1 <= child <= n:
                raise BuildError(f"inode {i}: entry {name!r} points at missing inode {child}")
            named_by[child].append(i)
    if named_by[L.ROOT_INO] or inodes[0].parent != L.ROOT_INO:
        raise BuildError("the root directory must not be named by any entry")
    for i, spec in enumerate(inodes[1:], start=2):
        if not named_by[i]:
            raise BuildError(f"inode {i} is not reachable from the root")
        if stat.S_ISDIR(spec.mode) and len(named_by[i]) != 1:
            raise BuildError(f"inode {i}: a directory must have exactly one name")
        if spec.parent not in named_by[i]:
            raise BuildError(f"inode {i}: parent {spec.parent} does not name it")


def _check_u32(ino: int, **values: int) -> None:
    for name, v in values.items():
        if not 0 <= v <= 0xFFFFFFFF:
            raise BuildError(f"inode {ino}: {name} {v} does not fit in 32 bits")


def _digest(
    spec: InodeSpec, nlink: int, chunk_digests: Sequence[bytes], kids: list[tuple[bytes, bytes]]
) -> bytes:
    return node_digest(
        mode=spec.mode, uid=spec.uid, gid=spec.gid, nlink=nlink, size=spec.size,
        mtime_sec=spec.mtime_sec, mtime_nsec=spec.mtime_nsec, rdev=spec.rdev,
        xattrs=spec.xattrs.items(), chunk_digests=chunk_digests, symlink_target=spec.target,
        children=kids,
    )
