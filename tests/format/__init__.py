"""Format-layer tests, plus ``SpecTree``: write_bootstrap inputs built by hand, no builder."""

from __future__ import annotations

import hashlib
import io
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

from nydusfs.format.chunk import chunk_digest, decode, encode
from nydusfs.format.layout import COMPRESSION_ZSTD, ROOT_INO
from nydusfs.format.reader import Bootstrap
from nydusfs.format.writer import BootstrapParams, ChunkPlacement, InodeSpec, write_bootstrap

__all__ = ["DEFAULT_PARAMS", "Built", "SpecTree", "sample_tree"]

DEFAULT_PARAMS = BootstrapParams(chunk_size=1 << 20, cdc=False, compression=COMPRESSION_ZSTD)


@dataclass
class Built:
    """A written bootstrap: its bytes and the root digest ``write_bootstrap`` returned."""

    data: bytes
    root_digest: bytes

    def open(self) -> Bootstrap:
        return Bootstrap.from_bytes(self.data)


@dataclass
class SpecTree:
    """Inputs for ``write_bootstrap``, grown entry by entry; inode N is ``inodes[N - 1]``.

    Directories get their numbers when created, after their parent, so subdirectories always
    have larger inode numbers. Chunk payloads really are encoded into in-memory blobs, so a test
    can fetch and decode any chunk the reader describes (``read_file``).
    """

    inodes: list[InodeSpec] = field(
        default_factory=lambda: [InodeSpec(stat.S_IFDIR | 0o755, parent=ROOT_INO)]
    )
    chunks: dict[bytes, ChunkPlacement] = field(default_factory=dict)
    blob_data: list[bytearray] = field(default_factory=lambda: [bytearray()])
    prefetch: list[int] = field(default_factory=list)
    params: BootstrapParams = DEFAULT_PARAMS

    # ---- entries ------------------------------------------------------------------------

    def add(self, parent: int, name: bytes, spec: InodeSpec) -> int:
        self.inodes.append(spec)
        ino = len(self.inodes)
        spec.parent = parent
        self.inodes[parent - 1].children.append((name, ino))
        return ino

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755, *, uid: int = 0, gid: int = 0,
              mtime_sec: int = 0, mtime_nsec: int = 0) -> int:
        return self.add(parent, name, InodeSpec(stat.S_IFDIR | mode, uid=uid, gid=gid,
                                                mtime_sec=mtime_sec, mtime_nsec=mtime_nsec))

    def file(
        self,
        parent: int,
        name: bytes,
        pieces: Sequence[bytes] = (),
        mode: int = 0o644,
        compress: bool = True,
        *,
        uid: int = 0,
        gid: int = 0,
        mtime_sec: int = 0,
        mtime_nsec: int = 0,
    ) -> int:
        digests = [self.add_chunk(p, compress) for p in pieces]
        size = sum(len(p) for p in pieces)
        return self.add(parent, name, InodeSpec(
            stat.S_IFREG | mode, size=size, chunks=digests, uid=uid, gid=gid,
            mtime_sec=mtime_sec, mtime_nsec=mtime_nsec))

    def symlink(self, parent: int, name: bytes, target: bytes, *, uid: int = 0, gid: int = 0,
                mtime_sec: int = 0, mtime_nsec: int = 0) -> int:
        return self.add(parent, name, InodeSpec(
            stat.S_IFLNK | 0o777, target=target, uid=uid, gid=gid, mtime_sec=mtime_sec,
            mtime_nsec=mtime_nsec))

    def special(self, parent: int, name: bytes, mode: int, rdev: int = 0, *, uid: int = 0,
                gid: int = 0) -> int:
        return self.add(parent, name, InodeSpec(mode, rdev=rdev, uid=uid, gid=gid))

    def link(self, parent: int, name: bytes, ino: int) -> None:
        """Another name for an existing (non-directory) inode."""
        self.inodes[parent - 1].children.append((name, ino))

    # ---- chunks -------------------------------------------------------------------------

    def new_blob(self) -> None:
        self.blob_data.append(bytearray())

    def add_chunk(self, data: bytes, compress: bool = True) -> bytes:
        """Place ``data`` (once) in the current blob; return its digest."""
        d = chunk_digest(data)
        if d not in self.chunks:
            payload, flags = encode(data, 3 if compress else None)
            blob = self.blob_data[-1]
            self.chunks[d] = ChunkPlacement(
                blob_index=len(self.blob_data) - 1, flags=flags, compressed_offset=len(blob),
                compressed_size=len(payload), uncompressed_size=len(data),
            )
            blob += payload
        return d

    def blobs(self) -> list[tuple[bytes, int]]:
        return [(hashlib.sha256(b).digest(), len(b)) for b in self.blob_data]

    # ---- output -------------------------------------------------------------------------

    def write(self) -> Built:
        out = io.BytesIO()
        root = write_bootstrap(out, self.inodes, self.chunks, self.blobs(), self.prefetch,
                               self.params)
        return Built(out.getvalue(), root)

    def read_file(self, b: Bootstrap, ino: int) -> bytes:
        """Fetch a file's content the way a mount would: ranged blob reads + ``decode``."""
        out = bytearray()
        for ref in b.file_chunks(ino):
            c = ref.chunk
            blob = self.blob_data[c.blob_index]
            payload = bytes(blob[c.compressed_offset : c.compressed_offset + c.compressed_size])
            out += decode(payload, c.flags, c.uncompressed_size, c.digest)
        return bytes(out)


def sample_tree() -> SpecTree:
    """A small but complete tree: every inode type, hardlinks, xattrs, two blobs, prefetch."""
    t = SpecTree()
    t.inodes[0].xattrs = {b"user.root": b"r"}
    t.inodes[0].mtime_sec, t.inodes[0].mtime_nsec = 1_700_000_000, 1
    etc = t.mkdir(1, b"etc", mtime_sec=1_600_000_000, mtime_nsec=999_999_999)
    usr = t.mkdir(1, b"usr", 0o755, uid=0, gid=0)
    bin_ = t.mkdir(usr, b"bin")
    tmp = t.mkdir(1, b"tmp", 0o1777)
    t.mkdir(1, b"empty", 0o2755, gid=50)
    t.file(etc, b"passwd", [b"root:x:0:0:root:/root:/bin/sh\n"], uid=0, gid=0,
           mtime_sec=1_650_000_000, mtime_nsec=123_456_789)
    t.file(etc, b"empty_file", [])
    big = [bytes([i]) * (1000 + 37 * i) for i in range(12)]
    big_ino = t.file(usr, b"big", big)
    t.new_blob()
    rnd = bytes((i * 7919 + 13) % 251 for i in range(5000))
    sh = t.file(bin_, b"sh", [rnd, rnd[::-1], b"tail"], mode=0o4755, compress=False)
    t.inodes[sh - 1].xattrs = {
        b"security.capability": b"\x01\x00\x00\x02\x00\x04\x00\x00" + bytes(12),
        b"user.a": b"", b"trusted.overlay.opaque": b"y",
    }
    t.link(usr, b"sh-hardlink", sh)
    t.link(tmp, b"sh-third-name", sh)
    t.symlink(etc, b"localtime", b"/usr/share/zoneinfo/UTC", uid=1000, gid=1000,
              mtime_sec=-2, mtime_nsec=500_000_000)
    t.symlink(usr, b"rel", b"../etc/passwd")
    t.special(1, b"null", stat.S_IFCHR | 0o666, rdev=(1 << 8) | 3)
    t.special(1, b"sda", stat.S_IFBLK | 0o660, rdev=(8 << 8), gid=6)
    t.special(tmp, b"fifo", stat.S_IFIFO | 0o640, uid=1000, gid=1000)
    t.special(tmp, b"sock", stat.S_IFSOCK | 0o755, uid=123456, gid=65534)
    t.file(tmp, b"\xff\xfe non-utf8 \n name", [b"odd"], mode=0o600)
    t.file(tmp, b"N" * 255, [b"long name"])
    t.prefetch = [sh, big_ino]
    return t
