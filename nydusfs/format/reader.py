"""Read a bootstrap in place: mmap + bounds-checked record reads, nothing decoded up front.

Bootstraps are untrusted input (they arrive from registries and peers). Opening one checks only
the header (magic, version, every table inside the file), so mount time does not grow with the
number of files. Each accessor then validates the record it decodes before returning it: every
index, offset and length is checked against the table or area it points into, so a malformed
bootstrap raises ``FormatError`` and can never cause an out-of-bounds read or an exception of
another kind. ``check()`` validates everything at once: structure, sorting, link counts and the
whole Merkle tree.

A mapped bootstrap can be made *resident* (``loader`` + ``adopt``): its bytes copied into
memory, so that metadata is served without page faults however the page cache is pressed, and
cannot change or vanish (a truncated file under an mmap is SIGBUS) if someone rewrites the file
while it is mounted. The copy is read from the same open file, checked against the header
checksum and swapped in by the caller between requests.

This module never touches blobs or the network.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import struct
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, BinaryIO

from nydusfs.errors import FormatError, IntegrityError
from nydusfs.format import layout as L
from nydusfs.format.merkle import node_digest
from nydusfs.format.records import (
    BlobRecord,
    ChunkRecord,
    ChunkRef,
    Dirent,
    Header,
    Inode,
    Listing,
    Xattr,
)

__all__ = ["Bootstrap"]

_INODE_UNPACK = L.INODE.unpack_from
# The inode record's first 72 bytes, mode through xattr_index: what validation reads. Skipping
# the digest saves a bytes object per entry in listings.
_INODE_HEAD = struct.Struct("<IIIIQqIIQQIIQ")
assert L.INODE.format.startswith(_INODE_HEAD.format)
_INODE_HEAD_UNPACK = _INODE_HEAD.unpack_from
_INODE_SIZE = L.INODE.size
_DIRENT_ITER = L.DIRENT.iter_unpack
_DIRENT_SIZE = L.DIRENT.size
_S_IFMT = 0o170000
_S_IFREG = stat.S_IFREG
_S_IFDIR = stat.S_IFDIR
# Byte values, not b"/": `bytes in bytes` first tries the operand as an integer and formats a
# TypeError for it, several times slower than an `int in bytes` scan.
_SLASH = ord("/")
_NUL = 0


class Bootstrap:
    """A validated view over bootstrap bytes (usually an mmap of the file)."""

    def __init__(self, buf: bytes | mmap.mmap, *, name: str = "bootstrap",
                 file: BinaryIO | None = None) -> None:
        self._buf = buf
        self._file = file  # what ``buf`` maps, kept open for ``loader``; closed by ``close``
        self.name = name
        self.header = self._parse_header()
        t = self.header.tables
        self._off = {k: v[0] for k, v in t.items()}
        self._cnt = {k: v[1] for k, v in t.items()}
        # The hot paths (inode, dirent, listdir) read these on every record.
        self._n_inodes = self._cnt["inodes"]
        self._inodes_at = self._off["inodes"]
        self._n_strings = self._cnt["strings"]
        self._strings_at = self._off["strings"]

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Bootstrap:
        """Map the file read-only; raise ``FormatError`` if it is not a usable bootstrap."""
        try:
            f = open(path, "rb")  # noqa: SIM115 (kept open for ``loader``; ``close`` closes it)
        except OSError as exc:
            raise FormatError(f"{path}: cannot read bootstrap: {exc.strerror}") from exc
        buf: mmap.mmap | None = None
        try:
            try:
                size = os.fstat(f.fileno()).st_size
                if size < L.HEADER_SIZE:
                    raise FormatError(f"{path}: {size} bytes is too short for a bootstrap")
                buf = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            except OSError as exc:
                raise FormatError(f"{path}: cannot read bootstrap: {exc.strerror}") from exc
            return cls(buf, name=os.fspath(path), file=f)
        except BaseException:
            if buf is not None:
                buf.close()
            f.close()
            raise

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "bootstrap") -> Bootstrap:
        return cls(data, name=name)

    def close(self) -> None:
        if isinstance(self._buf, mmap.mmap):
            self._buf.close()
        if self._file is not None:
            self._file.close()
            self._file = None

    # ---- residency ----------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes of the bootstrap."""
        return len(self._buf)

    @property
    def resident(self) -> bool:
        """Whether records are read from memory (``from_bytes``, or ``adopt``) not a mapping."""
        return not isinstance(self._buf, mmap.mmap)

    def loader(self) -> Callable[[], bytes] | None:
        """A function returning a verified in-memory copy of this bootstrap, for ``adopt``.

        None if there is nothing to load (already resident, or closed). The function may run in
        another thread (it blocks, with the GIL released, in ``pread`` and blake3) while this
        object keeps serving: it owns a duplicate of the file descriptor, taken here, so closing
        the bootstrap meanwhile cannot make it read another file. It reads the bytes the mapping
        shows, from the same open file (the same inode, even if the path was replaced since),
        and raises ``IntegrityError`` unless they match the header's checksum (the file was
        corrupted or rewritten; the mapping keeps serving then) and ``FormatError`` if the file
        cannot be read in full.
        """
        buf = self._buf
        if not isinstance(buf, mmap.mmap) or buf.closed or self._file is None:
            return None
        try:
            fd = os.dup(self._file.fileno())
        except OSError as exc:
            raise FormatError(f"{self.name}: cannot read bootstrap: {exc.strerror}") from exc
        size, name, checksum = len(buf), self.name, self.header.checksum

        def load() -> bytes:
            try:
                pieces: list[bytes] = []
                got = 0
                while got < size:
                    piece = os.pread(fd, size - got, got)
                    if not piece:
                        raise FormatError(f"{name}: file shrank to {got} bytes while mounted")
                    pieces.append(piece)
                    got += len(piece)
            except OSError as exc:
                raise FormatError(f"{name}: cannot read bootstrap: {exc.strerror}") from exc
            finally:
                os.close(fd)
            data = b"".join(pieces)  # the one piece itself, in the usual case
            if L.bootstrap_checksum(data) != checksum:
                raise IntegrityError(f"{name}: header checksum mismatch (bootstrap corrupted "
                                     "or rewritten while mounted)")
            return data

        return load

    def adopt(self, data: bytes) -> None:
        """Serve records from ``data`` (what ``loader``'s function returned) from now on.

        Not thread safe: call it where the records are read (the event loop), never while
        another thread reads records. ``data`` must have this bootstrap's size and header
        (``FormatError`` otherwise); the mapping is released.
        """
        old = self._buf
        if isinstance(old, mmap.mmap) and old.closed:
            raise self._fail("closed")
        if len(data) != len(old) or data[: L.HEADER_SIZE] != old[: L.HEADER_SIZE]:
            raise self._fail("in-memory copy does not match the mapped bootstrap")
        self._buf = data
        if isinstance(old, mmap.mmap):
            # A view of it still alive somewhere (BufferError): it goes when the view does.
            with contextlib.suppress(BufferError):
                old.close()

    def __enter__(self) -> Bootstrap:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- header -------------------------------------------------------------------------

    def _fail(self, msg: str) -> FormatError:
        return FormatError(f"{self.name}: {msg}")

    def _parse_header(self) -> Header:
        size = len(self._buf)
        if size < L.HEADER_SIZE:
            raise self._fail(f"{size} bytes is too short for a bootstrap")
        f = L.HEADER.unpack_from(self._buf, 0)
        (magic, version, header_size, flags, chunk_size, digest_algo, compression, _r16,
         root_ino, _r32) = f[:10]
        desc = f[10:26]
        root_digest, checksum, reserved = f[26], f[27], f[28]
        if magic != L.MAGIC:
            raise self._fail("not a dfnydus bootstrap (bad magic)")
        if version != L.VERSION:
            raise self._fail(f"unsupported format version {version} (this reader: {L.VERSION})")
        if header_size != L.HEADER_SIZE:
            raise self._fail(f"bad header size {header_size}")
        if flags & ~L.FLAG_CDC:
            raise self._fail(f"unknown flags {flags:#x}")
        if digest_algo != L.DIGEST_BLAKE3:
            raise self._fail(f"unknown digest algorithm {digest_algo}")
        if compression not in (L.COMPRESSION_NONE, L.COMPRESSION_ZSTD):
            raise self._fail(f"unknown compression {compression}")
        if root_ino != L.ROOT_INO:
            raise self._fail(f"bad root inode {root_ino}")
        if _r16 or _r32 or any(reserved):
            raise self._fail("reserved header fields are not zero")
        pow2 = chunk_size & (chunk_size - 1) == 0
        if not (L.MIN_CHUNK_SIZE <= chunk_size <= L.MAX_CHUNK_SIZE and pow2):
            raise self._fail(f"bad chunk size {chunk_size}")
        tables: dict[str, tuple[int, int]] = {}
        prev_end = L.HEADER_SIZE
        for i, name in enumerate(L.TABLES):
            off, count = desc[2 * i], desc[2 * i + 1]
            end = off + count * L.RECORD_SIZES[name]
            if off < prev_end or end > size:
                raise self._fail(f"table {name} at {off} (+{count} records) is out of bounds")
            tables[name] = (off, count)
            prev_end = end
        if tables["inodes"][1] < 1:
            raise self._fail("no inodes")
        if tables["inodes"][1] > 0xFFFFFFFF:
            raise self._fail("too many inodes")
        return Header(version, flags, chunk_size, digest_algo, compression, root_ino, tables,
                      root_digest, checksum)

    # ---- raw records --------------------------------------------------------------------

    def _unpack(self, table: str, s: struct.Struct, index: int) -> tuple[Any, ...]:
        if not 0 <= index < self._cnt[table]:
            raise self._fail(f"{table} index {index} out of range (count {self._cnt[table]})")
        return s.unpack_from(self._buf, self._off[table] + index * s.size)

    def _string(self, off: int, length: int, what: str) -> bytes:
        if off + length > self._n_strings:
            raise self._fail(f"{what}: string at {off}+{length} outside the string area")
        base = self._strings_at + off
        return self._buf[base : base + length]  # a slice of bytes or of an mmap is bytes

    # ---- inodes -------------------------------------------------------------------------

    @property
    def inode_count(self) -> int:
        return self._cnt["inodes"]

    def inode(self, ino: int) -> Inode:
        """Decode and validate inode ``ino`` (1-based)."""
        if not 1 <= ino <= self._n_inodes:
            raise self._fail(f"inode {ino} out of range (count {self._n_inodes})")
        f = _INODE_UNPACK(self._buf, self._inodes_at + (ino - 1) * _INODE_SIZE)
        self._check_inode(ino, f)
        return Inode(ino, f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10],
                     f[11], f[12], f[14])

    def _check_inode(self, ino: int, f: tuple[Any, ...]) -> None:
        """Raise ``FormatError`` unless inode ``ino``'s raw fields are valid.

        ``f``: the record's fields in ``layout.INODE`` order, all of them or the first 13
        (through xattr_index: all that validation reads).
        """
        mode, size, mtime_nsec, parent = f[0], f[4], f[6], f[7]
        data_index, data_count, xattr_count, xattr_index = f[9], f[10], f[11], f[12]
        ftype = mode & _S_IFMT
        if ftype not in L.FILE_TYPES or mode & ~0o177777:
            raise self._fail(f"inode {ino}: bad mode {mode:#o}")
        if ino == L.ROOT_INO and ftype != stat.S_IFDIR:
            raise self._fail("root inode is not a directory")
        if mtime_nsec >= 1_000_000_000:
            raise self._fail(f"inode {ino}: bad mtime nanoseconds {mtime_nsec}")
        if not 1 <= parent <= self._n_inodes:
            raise self._fail(f"inode {ino}: bad parent {parent}")
        if xattr_index + xattr_count > self._cnt["xattrs"]:
            raise self._fail(f"inode {ino}: xattrs out of range")
        if ftype == stat.S_IFDIR:
            if data_index + data_count > self._cnt["dirents"]:
                raise self._fail(f"inode {ino}: directory entries out of range")
        elif ftype == stat.S_IFREG:
            if data_index + data_count > self._cnt["chunkrefs"]:
                raise self._fail(f"inode {ino}: chunk list out of range")
        elif ftype == stat.S_IFLNK:
            if not 0 < data_count <= L.MAX_SYMLINK_LEN or size != data_count:
                raise self._fail(f"inode {ino}: bad symlink length {data_count}")
            if data_index + data_count > self._n_strings:
                raise self._fail(f"inode {ino}: symlink target out of range")
        elif data_count:
            raise self._fail(f"inode {ino}: special file with data")

    def _dir(self, ino: int | Inode) -> Inode:
        node = self.inode(ino) if isinstance(ino, int) else ino
        if not node.is_dir():
            raise self._fail(f"inode {node.ino} is not a directory")
        return node

    # ---- directories --------------------------------------------------------------------

    def dirent(self, index: int) -> Dirent:
        name_off, name_len, ftype, ino = self._unpack("dirents", L.DIRENT, index)
        name = self._string(name_off, name_len, f"dirent {index}")
        if not name or name in (b".", b"..") or _SLASH in name or _NUL in name:
            raise self._fail(f"dirent {index}: invalid name {name[:40]!r}")
        if not 1 < ino <= self._cnt["inodes"]:
            raise self._fail(f"dirent {index}: bad inode {ino}")
        return Dirent(name, ftype, ino)

    def readdir(self, ino: int | Inode, start: int = 0) -> Iterator[Dirent]:
        """Entries of a directory from position ``start`` (a stable readdir offset)."""
        d = self._dir(ino)
        for i in range(max(start, 0), d.data_count):
            yield self.dirent(d.data_index + i)

    def listdir(self, ino: int | Inode, start: int = 0) -> Listing:
        """A directory's entries from position ``start``: names, inode numbers and modes.

        What a directory listing needs, decoded in one pass: the run of dirents is unpacked at
        once and each child's inode record only as far as validation needs, several times
        faster than ``readdir`` + ``inode`` per entry. Every record is validated exactly as
        ``dirent`` and ``inode`` do, in the same order, and a bad one raises the same
        ``FormatError``. The result holds no object per entry (see ``Listing``).
        """
        d = self._dir(ino)
        first = max(start, 0)
        names: list[bytes] = []
        inos: list[int] = []
        modes: list[int] = []
        if first < d.data_count:
            buf = self._buf
            n_inodes, n_strings = self._n_inodes, self._n_strings
            strings_at, inodes_at = self._strings_at, self._inodes_at
            n_xattrs, n_dirents = self._cnt["xattrs"], self._cnt["dirents"]
            n_chunkrefs = self._cnt["chunkrefs"]
            check_inode = self._check_inode
            at = self._off["dirents"] + (d.data_index + first) * _DIRENT_SIZE
            run = buf[at : at + (d.data_count - first) * _DIRENT_SIZE]
            index = d.data_index + first
            for name_off, name_len, _type, child in _DIRENT_ITER(run):
                if name_off + name_len <= n_strings:
                    name = buf[strings_at + name_off : strings_at + name_off + name_len]
                else:
                    name = b""
                if (not name or name == b"." or name == b".." or _SLASH in name
                        or _NUL in name or not 1 < child <= n_inodes):
                    self.dirent(index)  # raises the error dirent() gives for this record
                    raise self._fail(f"dirent {index}: invalid")  # not reached
                f = _INODE_HEAD_UNPACK(buf, inodes_at + (child - 1) * _INODE_SIZE)
                # _check_inode's checks of a file or directory other than the root (child > 1),
                # inline: most entries are those. Anything else (or anything wrong) takes the
                # full check, which raises its error or passes a valid other type.
                mode = f[0]
                ftype = mode & _S_IFMT
                if ftype == _S_IFREG:
                    limit = n_chunkrefs
                elif ftype == _S_IFDIR:
                    limit = n_dirents
                else:
                    limit = -1
                if (limit < 0 or mode & ~0o177777 or f[6] >= 1_000_000_000
                        or not 1 <= f[7] <= n_inodes or f[12] + f[11] > n_xattrs
                        or f[9] + f[10] > limit):
                    check_inode(child, f)
                names.append(name)
                inos.append(child)
                modes.append(mode)
                index += 1
        return Listing(names, inos, modes)

    def lookup(self, ino: int | Inode, name: bytes) -> Dirent | None:
        """Binary search one directory for ``name``; None if absent."""
        d = self._dir(ino)
        lo, hi = 0, d.data_count
        while lo < hi:
            mid = (lo + hi) // 2
            e = self.dirent(d.data_index + mid)
            if e.name == name:
                return e
            if e.name < name:
                lo = mid + 1
            else:
                hi = mid
        return None

    def resolve(self, path: str | bytes) -> Inode:
        """Inode at ``path`` (relative to the root; symlinks are not followed)."""
        p = os.fsencode(path)
        node = self.inode(L.ROOT_INO)
        for comp in p.split(b"/"):
            if comp in (b"", b"."):
                continue
            e = self.lookup(node, comp) if node.is_dir() else None
            if e is None:
                raise FileNotFoundError(f"{os.fsdecode(p)}: no such file in {self.name}")
            node = self.inode(e.ino)
        return node

    def walk(self) -> Iterator[tuple[bytes, Inode]]:
        """Every (path, inode) depth-first, the root first as ``b"/"``; iterative: any depth."""
        # Entries are pushed undecoded, each directory is expanded at most once, and the
        # entries expanded may not exceed the dirent table (runs are disjoint in a valid
        # bootstrap), so a malformed one (cycles, shared runs) costs O(inodes + dirents).
        stack: list[tuple[bytes, int]] = [(b"/", L.ROOT_INO)]
        expanded: set[int] = set()
        budget = self._cnt["dirents"]
        while stack:
            path, ino = stack.pop()
            node = self.inode(ino)
            yield path, node
            if node.is_dir():
                if ino in expanded:
                    raise self._fail(f"inode {ino}: directory reached twice (cycle or shared)")
                expanded.add(ino)
                budget -= node.data_count
                if budget < 0:
                    raise self._fail(f"inode {ino}: directories share entries")
                prefix = path if path == b"/" else path + b"/"
                for i in range(node.data_count - 1, -1, -1):
                    e = self.dirent(node.data_index + i)
                    stack.append((prefix + e.name, e.ino))

    # ---- symlinks and xattrs ------------------------------------------------------------

    def readlink(self, ino: int | Inode) -> bytes:
        node = self.inode(ino) if isinstance(ino, int) else ino
        if not node.is_symlink():
            raise self._fail(f"inode {node.ino} is not a symlink")
        return self._string(node.data_index, node.data_count, f"inode {node.ino} target")

    def xattrs(self, ino: int | Inode) -> list[Xattr]:
        node = self.inode(ino) if isinstance(ino, int) else ino
        out = []
        total = 0
        for i in range(node.xattr_index, node.xattr_index + node.xattr_count):
            name_off, value_off, name_len, value_len = self._unpack("xattrs", L.XATTR, i)
            if not 0 < name_len <= L.MAX_XATTR_NAME_LEN or value_len > L.MAX_XATTR_VALUE_LEN:
                raise self._fail(f"xattr {i}: bad length")
            total += name_len + value_len
            if total > L.MAX_XATTR_TOTAL:
                raise self._fail(f"inode {node.ino}: xattrs exceed {L.MAX_XATTR_TOTAL} bytes")
            out.append(Xattr(self._string(name_off, name_len, f"xattr {i}"),
                             self._string(value_off, value_len, f"xattr {i}")))
        return out

    def getxattr(self, ino: int | Inode, name: bytes) -> bytes | None:
        for x in self.xattrs(ino):
            if x.name == name:
                return x.value
        return None

    # ---- chunks and blobs ---------------------------------------------------------------

    @property
    def chunk_count(self) -> int:
        return self._cnt["chunks"]

    @property
    def blob_count(self) -> int:
        return self._cnt["blobs"]

    def blob(self, index: int) -> BlobRecord:
        sha, size, _res = self._unpack("blobs", L.BLOB, index)
        return BlobRecord(index, sha, size)

    def blobs(self) -> list[BlobRecord]:
        return [self.blob(i) for i in range(self._cnt["blobs"])]

    def chunk(self, index: int) -> ChunkRecord:
        digest, blob_index, flags, c_off, c_size, u_size = self._unpack("chunks", L.CHUNK, index)
        where = f"chunk {index}"
        if flags & ~L.CHUNK_FLAG_ZSTD:
            raise self._fail(f"{where}: unknown flags {flags:#x}")
        if not 0 < u_size <= L.MAX_CHUNK_SIZE or c_size == 0:
            raise self._fail(f"{where}: bad size {c_size}/{u_size}")
        if not flags & L.CHUNK_FLAG_ZSTD and c_size != u_size:
            raise self._fail(f"{where}: raw chunk with compressed size {c_size} != {u_size}")
        blob = self.blob(blob_index) if blob_index < self._cnt["blobs"] else None
        if blob is None or c_off + c_size > blob.size:
            raise self._fail(f"{where}: extent {c_off}+{c_size} outside blob {blob_index}")
        return ChunkRecord(index, digest, blob_index, flags, c_off, c_size, u_size)

    def chunks(self) -> Iterator[ChunkRecord]:
        for i in range(self._cnt["chunks"]):
            yield self.chunk(i)

    def find_chunk(self, digest: bytes) -> ChunkRecord | None:
        """Binary search the digest-sorted chunk table."""
        lo, hi = 0, self._cnt["chunks"]
        base, size = self._off["chunks"], L.CHUNK.size
        while lo < hi:
            mid = (lo + hi) // 2
            d = bytes(self._buf[base + mid * size : base + mid * size + L.DIGEST_SIZE])
            if d == digest:
                return self.chunk(mid)
            if d < digest:
                lo = mid + 1
            else:
                hi = mid
        return None

    def chunkref(self, index: int) -> ChunkRef:
        file_offset, chunk_index, _res = self._unpack("chunkrefs", L.CHUNKREF, index)
        return ChunkRef(file_offset, self.chunk(chunk_index))

    def file_chunks(self, ino: int | Inode) -> list[ChunkRef]:
        node = self.inode(ino) if isinstance(ino, int) else ino
        if not node.is_reg():
            raise self._fail(f"inode {node.ino} is not a regular file")
        return [self.chunkref(node.data_index + i) for i in range(node.data_count)]

    def chunks_for_range(self, ino: int | Inode, offset: int, size: int) -> list[ChunkRef]:
        """The chunks covering bytes [offset, offset+size) of a file, clipped to its size."""
        node = self.inode(ino) if isinstance(ino, int) else ino
        if not node.is_reg():
            raise self._fail(f"inode {node.ino} is not a regular file")
        end = min(offset + size, node.size)
        if offset >= end or node.data_count == 0:
            return []
        lo, hi = 0, node.data_count - 1
        while lo < hi:  # last ref whose file_offset <= offset
            mid = (lo + hi + 1) // 2
            off, _c, _r = self._unpack("chunkrefs", L.CHUNKREF, node.data_index + mid)
            if off <= offset:
                lo = mid
            else:
                hi = mid - 1
        out: list[ChunkRef] = []
        for i in range(lo, node.data_count):
            ref = self.chunkref(node.data_index + i)
            if ref.file_offset >= end:
                break
            out.append(ref)
        return out

    def prefetch(self) -> list[int]:
        """Inode numbers of the prefetch list, validated as regular files."""
        out = []
        for i in range(self._cnt["prefetch"]):
            (ino,) = self._unpack("prefetch", L.PREFETCH, i)
            if not self.inode(ino).is_reg():
                raise self._fail(f"prefetch entry {i}: inode {ino} is not a regular file")
            out.append(ino)
        return out

    # ---- full validation ----------------------------------------------------------------

    def check(self) -> dict[str, int]:
        """Validate everything: checksum, every record, tree shape, nlink, Merkle digests.

        Raises ``FormatError`` (``IntegrityError`` for digest mismatches) on the first problem;
        returns counts on success.
        """
        if L.bootstrap_checksum(memoryview(self._buf)) != self.header.checksum:
            raise IntegrityError(f"{self.name}: header checksum mismatch (bootstrap corrupted)")
        n = self._cnt["inodes"]
        inodes = [self.inode(i) for i in range(1, n + 1)]
        self._check_disjoint_runs(inodes)
        refs = [0] * (n + 1)
        files = dirs = 0
        for node in inodes:
            if node.is_dir():
                dirs += 1
                prev: bytes | None = None
                subdirs = 0
                for e in self.readdir(node):
                    if prev is not None and e.name <= prev:
                        raise self._fail(f"inode {node.ino}: entries not sorted at {e.name!r}")
                    prev = e.name
                    child = inodes[e.ino - 1]
                    if e.type != child.mode >> 12:
                        raise self._fail(f"inode {node.ino}: entry {e.name!r} has wrong type")
                    refs[e.ino] += 1
                    if child.is_dir():
                        subdirs += 1
                        if e.ino <= node.ino or child.parent != node.ino or refs[e.ino] > 1:
                            raise self._fail(f"inode {e.ino}: directory linked badly")
                if node.nlink != 2 + subdirs:
                    raise self._fail(f"inode {node.ino}: nlink {node.nlink} != {2 + subdirs}")
            elif node.is_reg():
                files += 1
                off = 0
                for ref in self.file_chunks(node):
                    if ref.file_offset != off:
                        raise self._fail(f"inode {node.ino}: chunk at {ref.file_offset} != {off}")
                    off += ref.chunk.uncompressed_size
                if off != node.size:
                    raise self._fail(f"inode {node.ino}: chunks hold {off} bytes, size {node.size}")
            elif node.is_symlink():
                self.readlink(node)
            names = [x.name for x in self.xattrs(node)]
            if names != sorted(set(names)):
                raise self._fail(f"inode {node.ino}: xattrs not sorted/unique")
        if inodes[0].parent != L.ROOT_INO or refs[L.ROOT_INO]:
            raise self._fail("root directory is linked from elsewhere")
        for node in inodes[1:]:
            if refs[node.ino] == 0:
                raise self._fail(f"inode {node.ino} is not reachable from the root")
            if not node.is_dir() and node.nlink != refs[node.ino]:
                raise self._fail(f"inode {node.ino}: nlink {node.nlink} != {refs[node.ino]} names")
        prev_digest = b""
        for c in self.chunks():
            if c.digest <= prev_digest:
                raise self._fail(f"chunk {c.index}: table not sorted by digest")
            prev_digest = c.digest
        self.prefetch()
        self._check_merkle(inodes)
        return {
            "inodes": n, "files": files, "directories": dirs, "chunks": self._cnt["chunks"],
            "blobs": self._cnt["blobs"],
        }

    def _check_disjoint_runs(self, inodes: list[Inode]) -> None:
        """Each inode owns its dirent/chunkref/xattr run (shared runs make checks quadratic)."""
        runs: dict[str, list[tuple[int, int, int]]] = {"dirents": [], "chunkrefs": [],
                                                         "xattrs": []}
        for node in inodes:
            if node.is_dir() and node.data_count:
                runs["dirents"].append((node.data_index, node.data_count, node.ino))
            elif node.is_reg() and node.data_count:
                runs["chunkrefs"].append((node.data_index, node.data_count, node.ino))
            if node.xattr_count:
                runs["xattrs"].append((node.xattr_index, node.xattr_count, node.ino))
        for table, spans in runs.items():
            end = 0
            for start, count, ino in sorted(spans):
                if start < end:
                    raise self._fail(f"inode {ino}: {table} overlap another inode's")
                end = start + count

    def _check_merkle(self, inodes: list[Inode]) -> None:
        computed: list[bytes] = [b""] * (len(inodes) + 1)

        def digest(node: Inode, kids: list[tuple[bytes, bytes]]) -> bytes:
            return node_digest(
                mode=node.mode, uid=node.uid, gid=node.gid, nlink=node.nlink, size=node.size,
                mtime_sec=node.mtime_sec, mtime_nsec=node.mtime_nsec, rdev=node.rdev,
                xattrs=[(x.name, x.value) for x in self.xattrs(node)],
                chunk_digests=[r.chunk.digest for r in self.file_chunks(node)]
                if node.is_reg() else (),
                symlink_target=self.readlink(node) if node.is_symlink() else b"",
                children=kids,
            )

        for node in inodes:
            if not node.is_dir():
                computed[node.ino] = digest(node, [])
        for node in reversed(inodes):
            if node.is_dir():
                computed[node.ino] = digest(
                    node, [(e.name, computed[e.ino]) for e in self.readdir(node)])
        for node in inodes:
            if computed[node.ino] != node.digest:
                raise IntegrityError(f"{self.name}: inode {node.ino}: Merkle digest mismatch")
        if computed[L.ROOT_INO] != self.header.root_digest:
            raise IntegrityError(f"{self.name}: root digest does not match the header")
