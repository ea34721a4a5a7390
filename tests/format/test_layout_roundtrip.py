"""write_bootstrap + Bootstrap, directly (no builder): round trips, lookups, Merkle, tampering."""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import mmap
import random
import stat
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from treegen import DEEP_DEPTH, FullTreeInfo, Snapshot, read_file_at, snapshot_tree

from nydusfs.errors import BuildError, FormatError, IntegrityError
from nydusfs.format import layout as L
from nydusfs.format.chunk import chunk_digest
from nydusfs.format.reader import Bootstrap
from nydusfs.format.records import Inode
from nydusfs.format.writer import BootstrapParams, ChunkPlacement, InodeSpec, write_bootstrap

from . import SpecTree, sample_tree

MiB = 1 << 20
D = stat.S_IFDIR
R = stat.S_IFREG


def fix_checksum(data: bytes | bytearray) -> bytes:
    """Recompute the header checksum (offset 200) after tampering."""
    out = bytearray(data)
    out[200:232] = L.bootstrap_checksum(out)
    return bytes(out)


def table_offset(b: Bootstrap, table: str, index: int = 0) -> int:
    off, count = b.header.tables[table]
    assert 0 <= index < count
    return off + index * L.RECORD_SIZES[table]


# ---- every inode type ---------------------------------------------------------------------


def test_every_inode_type_round_trips() -> None:
    t = sample_tree()
    built = t.write()
    b = built.open()
    assert b.check() == {"inodes": 18, "files": 6, "directories": 6, "chunks": 18, "blobs": 2}
    assert b.header.root_digest == built.root_digest == b.inode(1).digest
    assert b.inode_count == len(t.inodes)

    seen_types = set()
    for ino, spec in enumerate(t.inodes, start=1):
        node = b.inode(ino)
        seen_types.add(stat.S_IFMT(node.mode))
        assert node.ino == ino
        assert node.mode == spec.mode
        assert (node.uid, node.gid) == (spec.uid, spec.gid)
        assert (node.mtime_sec, node.mtime_nsec) == (spec.mtime_sec, spec.mtime_nsec)
        assert node.mtime_ns == spec.mtime_sec * 10**9 + spec.mtime_nsec
        assert node.rdev == spec.rdev
        assert node.parent == spec.parent
        assert len(node.digest) == 32
        assert [(x.name, x.value) for x in b.xattrs(ino)] == sorted(spec.xattrs.items())
        for name, value in spec.xattrs.items():
            assert b.getxattr(ino, name) == value
        assert b.getxattr(ino, b"user.absent") is None
        if node.is_dir():
            entries = list(b.readdir(ino))
            assert [(e.name, e.ino) for e in entries] == sorted(spec.children)
            for e in entries:
                assert e.type == t.inodes[e.ino - 1].mode >> 12
            assert node.data_count == len(spec.children)
            with pytest.raises(FormatError):
                b.file_chunks(ino)
            with pytest.raises(FormatError):
                b.readlink(ino)
        elif node.is_reg():
            assert node.size == spec.size
            refs = b.file_chunks(ino)
            assert [r.chunk.digest for r in refs] == spec.chunks
            offsets = [0]
            for r in refs:
                offsets.append(offsets[-1] + r.chunk.uncompressed_size)
            assert [r.file_offset for r in refs] == offsets[:-1]
            assert offsets[-1] == spec.size
            content = t.read_file(b, ino)  # fetched from the blobs and decoded
            assert len(content) == spec.size
            for r in refs:
                piece = content[r.file_offset : r.file_offset + r.chunk.uncompressed_size]
                assert chunk_digest(piece) == r.chunk.digest
            with pytest.raises(FormatError):
                list(b.readdir(ino))
        elif node.is_symlink():
            assert b.readlink(ino) == spec.target
            assert node.size == len(spec.target)
        else:
            assert node.data_count == 0
            assert stat.S_IFMT(node.mode) in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
                                              stat.S_IFSOCK)
    assert seen_types == {stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                          stat.S_IFIFO, stat.S_IFSOCK}

    # Paths, resolution and content.
    paths = {p: n.ino for p, n in b.walk()}
    assert paths[b"/"] == 1
    assert paths[b"/usr/bin/sh"] == paths[b"/usr/sh-hardlink"] == paths[b"/tmp/sh-third-name"]
    assert len(paths) == 20  # 18 inodes, one of them with three names
    for p, ino in paths.items():
        assert b.resolve(p).ino == ino
    assert b.resolve("/usr/bin/sh").mode == stat.S_IFREG | 0o4755
    assert b.resolve(b"/tmp/\xff\xfe non-utf8 \n name").size == 3
    assert b.resolve(b"//usr/./bin//sh/").ino == paths[b"/usr/bin/sh"]
    assert b.resolve(b"").ino == b.resolve(b"/").ino == 1
    for missing in (b"/nope", b"/usr/bin/sh/x", b"/usr/bin/../bin/sh", b"/etc/localtime/x"):
        with pytest.raises(FileNotFoundError):
            b.resolve(missing)
    sh = paths[b"/usr/bin/sh"]
    rnd = bytes((i * 7919 + 13) % 251 for i in range(5000))
    assert t.read_file(b, sh) == rnd + rnd[::-1] + b"tail"
    assert t.read_file(b, paths[b"/usr/big"]) == b"".join(
        bytes([i]) * (1000 + 37 * i) for i in range(12)
    )
    assert t.read_file(b, paths[b"/etc/empty_file"]) == b""
    assert b.readlink(paths[b"/usr/rel"]) == b"../etc/passwd"
    assert b.inode(paths[b"/etc/localtime"]).mtime_ns == -1_500_000_000

    # Blobs and prefetch.
    assert [(x.sha256, x.size) for x in b.blobs()] == t.blobs()
    assert b.blob_count == 2
    assert b.blobs()[0].oci_digest == "sha256:" + hashlib.sha256(t.blob_data[0]).hexdigest()
    assert b.prefetch() == t.prefetch
    chunk_blobs = {c.blob_index for c in b.chunks()}
    assert chunk_blobs == {0, 1}
    flags = {c.flags for c in b.chunks()}
    assert flags == {0, L.CHUNK_FLAG_ZSTD}  # raw (compress=False) and compressed chunks


@pytest.mark.parametrize(
    "params",
    [BootstrapParams(chunk_size=1 << 20), BootstrapParams(chunk_size=64 * 1024, cdc=True),
     BootstrapParams(chunk_size=16 * MiB, compression=L.COMPRESSION_NONE)],
    ids=["fixed-1MiB-zstd", "cdc-64KiB", "fixed-16MiB-none"],
)
def test_header_fields_round_trip(params: BootstrapParams) -> None:
    t = sample_tree()
    t.params = params
    b = t.write().open()
    h = b.header
    assert (h.chunk_size, h.cdc, h.compression) == (params.chunk_size, params.cdc,
                                                    params.compression)
    assert (h.version, h.digest_algo, h.root_ino) == (L.VERSION, L.DIGEST_BLAKE3, L.ROOT_INO)
    assert h.flags == (L.FLAG_CDC if params.cdc else 0)
    assert b.check()["inodes"] == 18


def test_layout_is_aligned_and_in_table_order() -> None:
    built = sample_tree().write()
    b, data = built.open(), built.data
    assert data[:8] == L.MAGIC
    prev_end = L.HEADER_SIZE
    for name in L.TABLES:
        off, count = b.header.tables[name]
        assert off % 8 == 0 and off >= prev_end
        prev_end = off + count * L.RECORD_SIZES[name]
    assert len(data) % 8 == 0 and len(data) - prev_end < 8
    assert data[232:256] == bytes(24) and data[30:32] == bytes(2) and data[36:40] == bytes(4)


def test_open_file_matches_from_bytes(tmp_path: Path) -> None:
    built = sample_tree().write()
    path = tmp_path / "bootstrap"
    path.write_bytes(built.data)
    mem = built.open()
    with Bootstrap.open(path) as mapped:
        assert mapped.name == str(path)
        assert mapped.check() == mem.check()
        assert [(p, n) for p, n in mapped.walk()] == [(p, n) for p, n in mem.walk()]
        assert mapped.find_chunk(next(mem.chunks()).digest) == next(mem.chunks())
    assert isinstance(mapped._buf, mmap.mmap) and mapped._buf.closed
    with pytest.raises(FormatError):
        Bootstrap.open(tmp_path / "missing")
    with pytest.raises(FormatError):
        Bootstrap.open(tmp_path)  # a directory
    (tmp_path / "short").write_bytes(built.data[:100])
    with pytest.raises(FormatError):
        Bootstrap.open(tmp_path / "short")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(FormatError):
        Bootstrap.open(tmp_path / "empty")


# ---- lookup in a big directory ------------------------------------------------------------


def _random_name(rng: random.Random) -> bytes:
    while True:
        n = bytes(rng.choice([c for c in range(1, 256) if c != 0x2F])
                  for _ in range(rng.randint(1, 40)))
        if n not in (b".", b".."):
            return n


def test_lookup_binary_search_in_thousands_of_entries() -> None:
    rng = random.Random(42)
    names: set[bytes] = {b"\xff\xfe", b"\xff", b"\x80abc", b"a", b"a\x80", b"B", b"\x01",
                         b"\xff" * 255, b"caf\xc3\xa9", b"caf\xe9", b" ", b"new\nline"}
    while len(names) < 4000:
        names.add(_random_name(rng))
    t = SpecTree()
    big = t.mkdir(1, b"big")
    expected: dict[bytes, int] = {}
    for i, name in enumerate(sorted(names, key=lambda _: rng.random())):  # insertion: random
        if i % 10 == 0:
            expected[name] = t.mkdir(big, name)
        elif i % 10 == 1:
            expected[name] = t.symlink(big, name, b"target")
        else:
            expected[name] = t.file(big, name, [])
    built = t.write()
    b = built.open()
    assert b.check()["inodes"] == 4002
    entries = list(b.readdir(big))
    assert [e.name for e in entries] == sorted(names)  # byte order, not locale or UTF-8 order
    # readdir offsets are stable positions.
    assert [e.name for e in b.readdir(big, start=3990)] == sorted(names)[3990:]
    assert list(b.readdir(big, start=4000)) == [] and list(b.readdir(big, start=-5)) == entries

    for name, ino in expected.items():
        e = b.lookup(big, name)
        assert e is not None and (e.name, e.ino) == (name, ino)
        assert e.type == t.inodes[ino - 1].mode >> 12
        assert b.resolve(b"/big/" + name).ino == ino

    ordered = sorted(names)
    absent = {b"", b"\x00", b"\xff" * 256, b"zz/zz", ordered[0][:-1] or b"\x00",
              bytes([ordered[-1][0]]) + b"\xff" * 255}
    for lo, hi in itertools.pairwise(ordered):
        absent.add(lo + b"\x00")  # sorts between lo and anything starting with lo + b"\x01"
        if hi[:-1] not in names:
            absent.add(hi[:-1])
    absent -= names
    assert len(absent) > 3000
    for name in absent:
        assert b.lookup(big, name) is None
    assert b.lookup(1, b"big") is not None and b.lookup(1, b"bi") is None
    symlink = next(i for i in expected.values() if stat.S_ISLNK(t.inodes[i - 1].mode))
    with pytest.raises(FormatError):
        b.lookup(symlink, b"x")


def test_lookup_in_empty_directory_and_on_non_directory() -> None:
    t = SpecTree()
    f = t.file(1, b"f", [b"x"])
    e = t.mkdir(1, b"e")
    b = t.write().open()
    assert b.lookup(e, b"f") is None
    assert list(b.readdir(e)) == []
    with pytest.raises(FormatError):
        b.lookup(f, b"f")
    with pytest.raises(FileNotFoundError):
        b.resolve(b"/f/g")


# ---- chunks -------------------------------------------------------------------------------


def _many_chunk_file(seed: int, n: int) -> tuple[SpecTree, int, list[bytes]]:
    rng = random.Random(seed)
    pool = [rng.randbytes(rng.randint(1, 3000)) for _ in range(n)]
    pieces = [rng.choice(pool) if rng.random() < 0.15 else p for p in pool]  # some repeats
    pieces += [b"x", b"y" * 5000, b"z"]
    t = SpecTree()
    t.file(1, b"other", [b"before"])
    ino = t.file(1, b"f", pieces)
    t.file(1, b"zother", [b"after"])
    return t, ino, pieces


def _naive_range(pieces: list[bytes], offset: int, size: int) -> list[tuple[int, bytes]]:
    total = sum(map(len, pieces))
    end = min(offset + size, total)
    out = []
    pos = 0
    for p in pieces:
        if pos < end and pos + len(p) > offset:
            out.append((pos, chunk_digest(p)))
        pos += len(p)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_chunks_for_range_matches_naive(seed: int) -> None:
    t, ino, pieces = _many_chunk_file(seed, 400)
    b = t.write().open()
    b.check()
    total = sum(map(len, pieces))
    assert b.inode(ino).size == total
    bounds = [0]
    for p in pieces:
        bounds.append(bounds[-1] + len(p))
    rng = random.Random(seed)
    cases = [(0, total), (0, 0), (total, 10), (total - 1, 1), (total + 5, 1), (0, 2**63),
             (0, 1), (total - 1, 2**64)]
    for x in bounds[1:-1:7]:
        cases += [(x, 1), (x - 1, 1), (x - 1, 2), (x, 0), (x + 1, len(pieces[0]))]
    for _ in range(2000):
        off = rng.randint(0, total + 100)
        cases.append((off, rng.choice([1, rng.randint(0, 5000), rng.randint(0, total)])))
    for off, size in cases:
        got = [(r.file_offset, r.chunk.digest) for r in b.chunks_for_range(ino, off, size)]
        assert got == _naive_range(pieces, off, size), (off, size)
        if off < total and size > 0:
            # The refs cover the requested range contiguously.
            first, last = got[0][0], got[-1][0]
            assert first <= off
            assert last < min(off + size, total) <= last + len(pieces[bounds.index(last)])


def test_chunks_for_range_edge_files() -> None:
    t = SpecTree()
    empty = t.file(1, b"empty", [])
    one = t.file(1, b"one", [b"0123456789"])
    d = t.mkdir(1, b"d")
    b = t.write().open()
    assert b.chunks_for_range(empty, 0, 100) == []
    assert b.file_chunks(empty) == []
    assert [r.file_offset for r in b.chunks_for_range(one, 9, 1)] == [0]
    assert b.chunks_for_range(one, 10, 1) == []
    assert b.chunks_for_range(b.inode(one), 3, 4)[0].chunk.uncompressed_size == 10
    with pytest.raises(FormatError):
        b.chunks_for_range(d, 0, 1)


def test_find_chunk() -> None:
    t, ino, pieces = _many_chunk_file(7, 300)
    b = t.write().open()
    table = list(b.chunks())
    digests = [c.digest for c in table]
    assert digests == sorted(digests) and len(set(digests)) == len(digests) == len(t.chunks)
    assert set(digests) == {chunk_digest(p) for p in pieces} | {chunk_digest(b"before"),
                                                                 chunk_digest(b"after")}
    for c in table:
        assert b.find_chunk(c.digest) == c == b.chunk(c.index)
        p = t.chunks[c.digest]
        assert (c.blob_index, c.flags, c.compressed_offset, c.compressed_size,
                c.uncompressed_size) == (p.blob_index, p.flags, p.compressed_offset,
                                         p.compressed_size, p.uncompressed_size)
    for r in b.file_chunks(ino):
        assert b.find_chunk(r.chunk.digest) == r.chunk

    def bump(d: bytes, delta: int) -> bytes:
        return ((int.from_bytes(d, "big") + delta) % 2**256).to_bytes(32, "big")

    rng = random.Random(7)
    absent = {bytes(32), b"\xff" * 32, b"", digests[0][:31], digests[-1] + b"\x00"}
    absent |= {bump(d, delta) for d in digests for delta in (-1, 1)}
    absent |= {rng.randbytes(32) for _ in range(500)}
    absent -= set(digests)
    for d in absent:
        assert b.find_chunk(d) is None
    assert SpecTree().write().open().find_chunk(digests[0]) is None


# ---- nlink --------------------------------------------------------------------------------


def test_nlink_is_computed() -> None:
    t = SpecTree()
    a = t.mkdir(1, b"a")
    b_ = t.mkdir(1, b"b")
    t.mkdir(a, b"a1")
    t.mkdir(a, b"a2")
    f = t.file(a, b"f", [b"data"])
    t.link(b_, b"f2", f)
    t.link(1, b"f3", f)
    s = t.symlink(a, b"s", b"f")
    t.link(b_, b"s2", s)  # a hardlinked symlink (tar layers can have them)
    p = t.special(1, b"p", stat.S_IFIFO | 0o600)
    t.link(a, b"p2", p)
    one = t.file(b_, b"one", [])
    bs = t.write().open()
    bs.check()
    assert bs.inode(1).nlink == 2 + 2
    assert bs.inode(a).nlink == 2 + 2
    assert bs.inode(b_).nlink == 2
    assert bs.inode(f).nlink == 3
    assert bs.inode(s).nlink == 2
    assert bs.inode(p).nlink == 2
    assert bs.inode(one).nlink == 1
    assert bs.resolve(b"/f3").nlink == 3


# ---- Merkle digests -----------------------------------------------------------------------


def _spec_digest(b: Bootstrap, node: Inode) -> bytes:
    """The Merkle digest, computed from merkle.py's documented encoding (independently)."""
    is_dir = node.is_dir()
    h = blake3.blake3(b"dfnydus-merkle-v1\x00")
    h.update(struct.pack("<IIIIQqIQ", node.mode, node.uid, node.gid, 0 if is_dir else node.nlink,
                         0 if is_dir else node.size, node.mtime_sec, node.mtime_nsec, node.rdev))
    xs = sorted((x.name, x.value) for x in b.xattrs(node))
    h.update(struct.pack("<I", len(xs)))
    for name, value in xs:
        h.update(struct.pack("<I", len(name)) + name + struct.pack("<I", len(value)) + value)
    if node.is_reg():
        refs = b.file_chunks(node)
        h.update(struct.pack("<Q", len(refs)) + b"".join(r.chunk.digest for r in refs))
    elif node.is_symlink():
        target = b.readlink(node)
        h.update(struct.pack("<I", len(target)) + target)
    elif is_dir:
        entries = list(b.readdir(node))
        h.update(struct.pack("<Q", len(entries)))
        for e in sorted(entries, key=lambda e: e.name):
            h.update(struct.pack("<I", len(e.name)) + e.name + _spec_digest(b, b.inode(e.ino)))
    return h.digest()


def test_merkle_digests_follow_the_documented_encoding() -> None:
    built = sample_tree().write()
    b = built.open()
    for _, node in b.walk():
        assert node.digest == _spec_digest(b, node)
    assert built.root_digest == _spec_digest(b, b.inode(1))


def test_merkle_independent_of_child_order_and_inode_numbers() -> None:
    base = sample_tree()
    ref = base.write()

    shuffled = sample_tree()
    rng = random.Random(3)
    for spec in shuffled.inodes:
        rng.shuffle(spec.children)
        spec.xattrs = dict(reversed(list(spec.xattrs.items())))
    shuffled.chunks = dict(reversed(list(shuffled.chunks.items())))
    out = shuffled.write()
    assert out.root_digest == ref.root_digest
    assert out.data == ref.data  # order of inputs does not leak into the bytes either

    # Same tree, different numbering: directories created in another order, files first.
    t = SpecTree()
    t.inodes[0].xattrs = {b"user.root": b"r"}
    t.inodes[0].mtime_sec, t.inodes[0].mtime_nsec = 1_700_000_000, 1
    tmp = t.mkdir(1, b"tmp", 0o1777)
    t.special(tmp, b"sock", stat.S_IFSOCK | 0o755, uid=123456, gid=65534)
    t.file(tmp, b"N" * 255, [b"long name"])
    t.special(1, b"sda", stat.S_IFBLK | 0o660, rdev=(8 << 8), gid=6)
    t.special(1, b"null", stat.S_IFCHR | 0o666, rdev=(1 << 8) | 3)
    usr = t.mkdir(1, b"usr")
    t.symlink(usr, b"rel", b"../etc/passwd")
    t.new_blob()  # different blob placement: not part of the identity
    t.file(usr, b"big", [bytes([i]) * (1000 + 37 * i) for i in range(12)], compress=False)
    bin_ = t.mkdir(usr, b"bin")
    rnd = bytes((i * 7919 + 13) % 251 for i in range(5000))
    sh = t.file(tmp, b"sh-third-name", [rnd, rnd[::-1], b"tail"], mode=0o4755)
    t.inodes[sh - 1].xattrs = {
        b"user.a": b"", b"trusted.overlay.opaque": b"y",
        b"security.capability": b"\x01\x00\x00\x02\x00\x04\x00\x00" + bytes(12),
    }
    t.link(bin_, b"sh", sh)
    t.link(usr, b"sh-hardlink", sh)
    t.special(tmp, b"fifo", stat.S_IFIFO | 0o640, uid=1000, gid=1000)
    t.file(tmp, b"\xff\xfe non-utf8 \n name", [b"odd"], mode=0o600)
    t.mkdir(1, b"empty", 0o2755, gid=50)
    etc = t.mkdir(1, b"etc", mtime_sec=1_600_000_000, mtime_nsec=999_999_999)
    t.symlink(etc, b"localtime", b"/usr/share/zoneinfo/UTC", uid=1000, gid=1000,
              mtime_sec=-2, mtime_nsec=500_000_000)
    t.file(etc, b"empty_file", [])
    t.file(etc, b"passwd", [b"root:x:0:0:root:/root:/bin/sh\n"], mtime_sec=1_650_000_000,
           mtime_nsec=123_456_789)
    t.params = BootstrapParams(chunk_size=64 * 1024, cdc=True, compression=L.COMPRESSION_NONE)
    renumbered = t.write()
    assert renumbered.data != ref.data
    assert renumbered.root_digest == ref.root_digest
    rb = renumbered.open()
    rb.check()
    assert {p: n.digest for p, n in rb.walk()} == {p: n.digest for p, n in ref.open().walk()}


Mutation = Callable[[SpecTree], None]


def _set(ino: int, **kw: object) -> Mutation:
    def apply(t: SpecTree) -> None:
        for k, v in kw.items():
            setattr(t.inodes[ino - 1], k, v)
    return apply


def _rename(parent: int, old: bytes, new: bytes) -> Mutation:
    def apply(t: SpecTree) -> None:
        kids = t.inodes[parent - 1].children
        kids[:] = [(new if n == old else n, c) for n, c in kids]
    return apply


def _xattrs(ino: int, f: Callable[[dict[bytes, bytes]], dict[bytes, bytes]]) -> Mutation:
    def apply(t: SpecTree) -> None:
        t.inodes[ino - 1].xattrs = f(dict(t.inodes[ino - 1].xattrs))
    return apply


def _file_pieces(ino: int, pieces: list[bytes]) -> Mutation:
    def apply(t: SpecTree) -> None:
        t.inodes[ino - 1].chunks = [t.add_chunk(p) for p in pieces]
        t.inodes[ino - 1].size = sum(map(len, pieces))
    return apply


def _add_link(parent: int, name: bytes, ino: int) -> Mutation:
    def apply(t: SpecTree) -> None:
        t.link(parent, name, ino)
    return apply


def _flip_last(b: bytes) -> bytes:
    return b[:-1] + bytes([b[-1] ^ 0x01])


# sample_tree() inode numbers: 1 /, 2 etc, 3 usr, 4 usr/bin, 5 tmp, 6 empty, 7 etc/passwd,
# 8 etc/empty_file, 9 usr/big, 10 usr/bin/sh (+2 names), 11 etc/localtime, 12 usr/rel,
# 13 null, 14 sda, 15 tmp/fifo, 16 tmp/sock, 17 tmp/<non-utf8>, 18 tmp/NNN...
_RND = bytes((i * 7919 + 13) % 251 for i in range(5000))
CHANGES: dict[str, Mutation] = {
    "root mode": _set(1, mode=D | 0o750),
    "dir mode": _set(4, mode=D | 0o775),
    "file mode": _set(7, mode=R | 0o645),
    "setuid bit": _set(10, mode=R | 0o0755),
    "sticky bit": _set(5, mode=D | 0o0777),
    "file type": _set(16, mode=stat.S_IFIFO | 0o755),
    "uid": _set(7, uid=1),
    "gid": _set(7, gid=1),
    "dir uid": _set(4, uid=2**32 - 1),
    "symlink uid": _set(11, uid=1001),
    "mtime sec": _set(7, mtime_sec=1_650_000_001),
    "mtime nsec": _set(7, mtime_nsec=123_456_788),
    "dir mtime": _set(2, mtime_nsec=999_999_998),
    "root mtime": _set(1, mtime_sec=1_700_000_001),
    "symlink mtime": _set(11, mtime_nsec=500_000_001),
    "rdev": _set(13, rdev=(1 << 8) | 5),
    "rdev of a fifo": _set(15, rdev=1),
    "xattr value": _xattrs(10, lambda x: {**x, b"user.a": b"\x00"}),
    "xattr name": _xattrs(10, lambda x: {(b"user.b" if k == b"user.a" else k): v
                                         for k, v in x.items()}),
    "xattr added": _xattrs(7, lambda x: {**x, b"user.new": b""}),
    "xattr removed": _xattrs(10, lambda x: {k: v for k, v in x.items() if k != b"user.a"}),
    "root xattr": _xattrs(1, lambda x: {b"user.root": b"R"}),
    "cap byte": _xattrs(10, lambda x: {**x, b"security.capability": _flip_last(
        x[b"security.capability"])}),
    "file name": _rename(2, b"passwd", b"passwe"),
    "dir name": _rename(3, b"bin", b"bim"),
    "hardlink name": _rename(5, b"sh-third-name", b"sh-third-namf"),
    "non-utf8 name": _rename(5, b"\xff\xfe non-utf8 \n name", b"\xff\xff non-utf8 \n name"),
    "symlink target": _set(12, target=b"../etc/passwe"),
    "chunk content": _file_pieces(10, [_RND, _RND[::-1], b"tair"]),
    "chunk order": _file_pieces(10, [_RND[::-1], _RND, b"tail"]),
    "chunk split": _file_pieces(10, [_RND, _RND[::-1], b"ta", b"il"]),
    "empty file gets data": _file_pieces(8, [b"\x00"]),
    "extra hardlink": _add_link(4, b"sh2", 10),
    "extra name for a fifo": _add_link(1, b"fifo2", 15),
}


def _ancestors(t: SpecTree, ino: int) -> set[int]:
    parents: dict[int, set[int]] = {}
    for i, spec in enumerate(t.inodes, start=1):
        for _, c in spec.children:
            parents.setdefault(c, set()).add(i)
    out: set[int] = set()
    todo = [ino]
    while todo:
        for p in parents.get(todo.pop(), ()):
            if p not in out:
                out.add(p)
                todo.append(p)
    return out


@pytest.mark.parametrize("what", sorted(CHANGES))
def test_merkle_detects_every_change(what: str) -> None:
    base = sample_tree().write()
    t = sample_tree()
    CHANGES[what](t)
    changed = t.write()
    cb, bb = changed.open(), base.open()
    cb.check()
    assert changed.root_digest != base.root_digest
    assert cb.header.root_digest == changed.root_digest
    # Exactly the touched inodes and their ancestors changed digest; nothing else did.
    touched = {i for i in range(1, 19) if cb.inode(i).digest != bb.inode(i).digest}
    assert 1 in touched
    for ino in touched:
        assert touched >= _ancestors(t, ino)
    leaves = {i for i in touched if not cb.inode(i).is_dir() or not touched & {
        e.ino for e in cb.readdir(i)}}
    expected = set().union(*(_ancestors(t, i) | {i} for i in leaves))
    assert touched == expected


def _shift_blob0(t: SpecTree) -> None:
    t.blob_data[0][:0] = bytes(100)
    t.chunks.update({d: replace(p, compressed_offset=p.compressed_offset + 100)
                     for d, p in t.chunks.items() if p.blob_index == 0})


def _unused_chunk(t: SpecTree) -> None:
    t.add_chunk(b"not referenced by any file")


NON_CHANGES: dict[str, Mutation] = {
    "dir size": _set(2, size=4096),
    # sh (10) is named by usr/bin (4, its recorded parent), usr (3) and tmp (5): the parent
    # field of a hardlinked file may be any directory naming it, and is not part of its identity.
    "hardlink parent field: usr": _set(10, parent=3),
    "hardlink parent field: tmp": _set(10, parent=5),
    "blob placement": _shift_blob0,
    "extra blob": lambda t: t.blob_data.append(bytearray(b"unused blob")),
    "prefetch": lambda t: setattr(t, "prefetch", []),
    "params": lambda t: setattr(t, "params", BootstrapParams(chunk_size=4 * MiB, cdc=True)),
    "unused chunk": _unused_chunk,
}


@pytest.mark.parametrize("what", sorted(NON_CHANGES))
def test_merkle_ignores_what_a_reader_cannot_observe(what: str) -> None:
    base = sample_tree().write()
    t = sample_tree()
    NON_CHANGES[what](t)
    out = t.write()
    out.open().check()
    assert out.root_digest == base.root_digest
    assert out.data != base.data


# ---- reproducibility ----------------------------------------------------------------------


def test_same_inputs_give_identical_bytes() -> None:
    a = sample_tree().write()
    b = sample_tree().write()
    assert a.data == b.data and a.root_digest == b.root_digest
    t = sample_tree()
    specs = copy.deepcopy(t.inodes)
    first = t.write()
    second = t.write()  # writing must not consume or change the inputs
    assert first.data == second.data == a.data
    assert [s.children for s in t.inodes] == [s.children for s in specs]
    out = io.BytesIO()
    root = write_bootstrap(out, specs, t.chunks, t.blobs(), t.prefetch, t.params)
    assert out.getvalue() == a.data and root == a.root_digest


# ---- writer input validation --------------------------------------------------------------


def _tiny() -> SpecTree:
    t = SpecTree()
    d = t.mkdir(1, b"d")
    t.file(d, b"f", [b"content"])
    t.symlink(1, b"l", b"d/f")
    return t


def _child(name: bytes) -> Mutation:
    return lambda t: t.inodes[0].children.append((name, 3))


REJECTED: dict[str, Mutation] = {
    "name with slash": _child(b"a/b"),
    "name dotdot": _child(b".."),
    "name dot": _child(b"."),
    "empty name": _child(b""),
    "name with NUL": _child(b"a\x00b"),
    "256-byte name": _child(b"n" * 256),
    "duplicate entry": _child(b"l"),
    "duplicate entry, other inode": lambda t: t.inodes[0].children.append((b"d", 3)),
    "subdirectory with smaller ino": lambda t: t.inodes[1].children.append((b"up", 1)),
    "subdirectory loop": lambda t: t.inodes[1].children.append((b"self", 2)),
    "child ino 0": lambda t: t.inodes[0].children.append((b"z", 0)),
    "child ino past the end": lambda t: t.inodes[0].children.append((b"z", 99)),
    "size mismatch": _set(3, size=8),
    "size mismatch, empty file": lambda t: setattr(
        t.inodes[t.add(1, b"e", InodeSpec(R | 0o644, size=1)) - 1], "uid", 0),
    "chunk without placement": _set(3, chunks=[bytes(32)], size=0),
    "uid 2**32": _set(3, uid=2**32),
    "gid 2**32": _set(3, gid=2**32),
    "negative uid": _set(3, uid=-1),
    "mtime_nsec 10**9": _set(3, mtime_nsec=10**9),
    "mtime_nsec negative": _set(3, mtime_nsec=-1),
    "mtime_sec past i64": _set(3, mtime_sec=2**63),
    "rdev past u64": _set(3, rdev=2**64),
    "size past u64 (dir)": _set(2, size=2**64),
    "parent past u32": _set(3, parent=2**32),
    "empty symlink target": _set(4, target=b""),
    "symlink target with NUL": _set(4, target=b"a\x00b"),
    "symlink target 4096 bytes": _set(4, target=b"t" * 4096),
    "xattr name empty": _set(3, xattrs={b"": b"v"}),
    "xattr name 256 bytes": _set(3, xattrs={b"user." + b"n" * 251: b"v"}),
    "xattr value 64KiB + 1": _set(3, xattrs={b"user.v": b"v" * (65536 + 1)}),
    "root not a directory": _set(1, mode=R | 0o644, children=[]),
    "prefetch a directory": lambda t: setattr(t, "prefetch", [2]),
    "prefetch a symlink": lambda t: setattr(t, "prefetch", [4]),
    "prefetch ino 0": lambda t: setattr(t, "prefetch", [0]),
    "prefetch past the end": lambda t: setattr(t, "prefetch", [5]),
    "chunk digest of 31 bytes": lambda t: t.chunks.update(
        {b"x" * 31: ChunkPlacement(0, 0, 0, 1, 1)}),
    "chunk in a missing blob": lambda t: t.chunks.update(
        {bytes(32): ChunkPlacement(5, 0, 0, 1, 1)}),
    # _tiny(): 1 / {d, l}, 2 /d {f}, 3 /d/f, 4 /l -> d/f
    "non-dir parent does not name it": _set(3, parent=1),
    "non-dir parent is not a directory": _set(3, parent=4),
    "parent 0": _set(3, parent=0),
    "root parent field": _set(1, parent=2),
    # STILL FAILING (nydusfs/format/writer.py, _validate): ``stat.S_IFMT(spec.mode)`` runs
    # before the ``spec.mode < 0`` test, and the C ``stat.S_IFMT`` raises OverflowError for
    # a mode below 0 or at/above 2**32, so these escape as OverflowError, not BuildError.
    # Fix: range-check ``0 <= mode <= 0o177777`` before calling S_IFMT.
    "negative mode": _set(3, mode=-1),
    "mode 2**32": _set(3, mode=2**32 | R | 0o644),
    "negative gid": _set(3, gid=-1),
    "negative rdev": _set(3, rdev=-1),
    "negative size (dir)": _set(2, size=-1),
    "symlink with children": lambda t: t.inodes[3].children.append((b"x", 3)),
    "symlink with chunks": lambda t: setattr(t.inodes[3], "chunks", list(t.inodes[2].chunks)),
    "directory with chunks": lambda t: setattr(t.inodes[1], "chunks", list(t.inodes[2].chunks)),
}

# Regression: uid/gid/mtime/rdev out of range used to escape as ``struct.error`` (the writer
# computed Merkle digests before range-checking them); they must be a BuildError.
@pytest.mark.parametrize("what", sorted(REJECTED))
def test_writer_rejects_bad_input(what: str) -> None:
    t = _tiny()
    t.write().open().check()  # the unmutated tree is fine
    REJECTED[what](t)
    with pytest.raises(BuildError):
        t.write()


def test_writer_accepts_limits() -> None:
    t = _tiny()
    t.inodes[2].uid = t.inodes[2].gid = 2**32 - 1
    t.inodes[2].mtime_sec, t.inodes[2].mtime_nsec = -(2**63), 999_999_999
    t.inodes[2].xattrs = {b"u" * 255: b"v" * 65536}
    t.inodes[3].target = b"t" * 4095
    t.inodes[0].children.append((b"n" * 255, 3))
    t.inodes[1].rdev = 2**64 - 1
    b = t.write().open()
    b.check()
    f = b.resolve(b"/d/f")
    assert (f.uid, f.gid, f.mtime_sec, f.mtime_nsec) == (2**32 - 1, 2**32 - 1, -(2**63),
                                                        999_999_999)
    assert b.xattrs(f)[0].value == b"v" * 65536
    assert b.readlink(b.resolve(b"/l")) == b"t" * 4095
    assert b.resolve(b"/" + b"n" * 255).ino == f.ino and f.nlink == 2
    assert b.inode(2).rdev == 2**64 - 1


# Inputs that used to be accepted but produced bootstraps that Bootstrap.check() (or even
# Bootstrap()) rejects. The writer promises a BuildError for anything check() would reject.
INVALID_BUT_ACCEPTED: dict[str, Mutation] = {
    "regular file with children": lambda t: t.inodes[2].children.append((b"x", 4)),
    "directory with two names": lambda t: t.inodes[0].children.append((b"d2", 2)),
    "directory parent field wrong": _set(2, parent=2),
    "parent out of range": _set(3, parent=99),
    "unreachable inode": lambda t: t.inodes.append(InodeSpec(R | 0o644)),
    "unreachable directory": lambda t: t.inodes.append(InodeSpec(D | 0o755)),
    "mode without a file type": _set(3, mode=0o644),
    "mode above 0o177777": _set(3, mode=R | 0o1000644),
    "chunk_size not a power of two": lambda t: setattr(t, "params",
                                                       BootstrapParams(chunk_size=1000)),
    "chunk_size 0": lambda t: setattr(t, "params", BootstrapParams(chunk_size=0)),
    "chunk_size 32KiB": lambda t: setattr(t, "params", BootstrapParams(chunk_size=32 * 1024)),
    "chunk_size 32MiB": lambda t: setattr(t, "params", BootstrapParams(chunk_size=32 * MiB)),
    "unknown compression": lambda t: setattr(t, "params",
                                             BootstrapParams(chunk_size=MiB, compression=7)),
    "placement: unknown flags": lambda t: t.chunks.update(
        {d: replace(p, flags=6) for d, p in t.chunks.items()}),
    "placement: raw with compressed != uncompressed": lambda t: t.chunks.update(
        {d: replace(p, compressed_size=p.compressed_size + 1) for d, p in t.chunks.items()}),
    "placement: outside the blob": lambda t: t.chunks.update(
        {d: replace(p, compressed_offset=10**6) for d, p in t.chunks.items()}),
    "placement: negative offset": lambda t: t.chunks.update(
        {d: replace(p, compressed_offset=-1) for d, p in t.chunks.items()}),
    "placement: zero-size chunk": lambda t: _append_chunk(t, b"", ChunkPlacement(0, 0, 0, 0, 0)),
    "placement: zstd, compressed size 0": lambda t: t.chunks.update(
        {d: replace(p, flags=L.CHUNK_FLAG_ZSTD, compressed_size=0) for d, p in t.chunks.items()}),
    "placement: uncompressed size above 16 MiB": lambda t: _append_chunk(
        t, b"", ChunkPlacement(0, L.CHUNK_FLAG_ZSTD, 0, 1, 16 * MiB + 1)),
}


def _append_chunk(t: SpecTree, data: bytes, placement: ChunkPlacement) -> None:
    d = chunk_digest(data)
    t.chunks[d] = placement
    t.inodes[2].chunks.append(d)
    t.inodes[2].size += placement.uncompressed_size  # consistent: only the placement is wrong


def _raw_tiny() -> SpecTree:
    t = _tiny()
    t.chunks.clear()
    t.blob_data[:] = [bytearray()]
    t.inodes[2].chunks = [t.add_chunk(b"content", compress=False)]
    return t


@pytest.mark.parametrize("what", sorted(INVALID_BUT_ACCEPTED))
def test_writer_rejects_what_check_would_reject(what: str) -> None:
    t = _raw_tiny()
    t.write().open().check()  # the unmutated tree is fine
    INVALID_BUT_ACCEPTED[what](t)
    with pytest.raises(BuildError):
        t.write()


@pytest.mark.parametrize("sha", [b"abc", b"", bytes(31), bytes(33)])
def test_writer_rejects_blob_sha_of_wrong_length(sha: bytes) -> None:
    # Regression: struct "32s" silently pads a short digest and truncates a long one.
    t = _raw_tiny()
    out = io.BytesIO()
    with pytest.raises(BuildError):
        write_bootstrap(out, t.inodes, t.chunks, [(sha, 7)], [], t.params)
    assert out.getvalue() == b""  # nothing written


# Regression: these used to escape as struct.error.
@pytest.mark.parametrize("value", [2**64, -1])
@pytest.mark.parametrize("field", ["blob size", "compressed_offset", "compressed_size",
                                   "uncompressed_size", "blob_index"])
def test_writer_rejects_out_of_range_table_fields(field: str, value: int) -> None:
    t = _raw_tiny()
    blobs = t.blobs()
    if field == "blob size":
        blobs = [(blobs[0][0], value)]
    else:
        t.chunks.update({d: replace(p, **{field: value}) for d, p in t.chunks.items()})
    with pytest.raises(BuildError):
        write_bootstrap(io.BytesIO(), t.inodes, t.chunks, blobs, [], t.params)


# ---- writer: valid output or BuildError, property-based ------------------------------------

_S = stat
# Modes below 0 or at/above 2**32 are left out: they hit the OverflowError bug pinned by
# test_writer_rejects_bad_input[negative mode] / [mode 2**32].
_INODE_VALUES: dict[str, list[int]] = {
    "mode": [D | 0o755, R | 0o644, R | 0o7777, _S.S_IFLNK | 0o777, _S.S_IFCHR | 0o600,
             _S.S_IFBLK | 0o600, _S.S_IFIFO | 0o600, _S.S_IFSOCK | 0o600, 0o644, 0o170644,
             0o177777, 0o200000 | R, 2**32 - 1],
    "uid": [0, 2**32 - 1, 2**32],
    "gid": [0, 2**32 - 1, 2**32],
    "mtime_sec": [-(2**63), 2**63 - 1, 2**63, -(2**63) - 1],
    "mtime_nsec": [0, 999_999_999, 10**9],
    "rdev": [0, 2**64 - 1, 2**64],
    "size": [0, 1, 30, 2**64 - 1, 2**64],
    "parent": [*range(0, 20), 2**32],
}
_PLACEMENT_VALUES: dict[str, list[int]] = {
    "blob_index": [0, 1, 2, 2**32],
    "flags": [0, 1, 2, 3],
    "compressed_offset": [0, 1, 5000, 2**64 - 1],
    "compressed_size": [0, 1, 30, 2**32 - 1, 2**32],
    "uncompressed_size": [0, 1, 30, L.MAX_CHUNK_SIZE, L.MAX_CHUNK_SIZE + 1],
}
_NAMES = [b"a", b"etc", b"sh", b"zz", b"passwd"]


@st.composite
def _writer_mutation(draw: st.DrawFn) -> Mutation:
    kind = draw(st.sampled_from(["inode", "inode", "inode", "child+", "child-", "chunks",
                                 "placement", "params"]))
    ino = draw(st.integers(1, 18))
    if kind == "inode":
        field_name = draw(st.sampled_from(sorted(_INODE_VALUES)))
        return _set(ino, **{field_name: draw(st.sampled_from(_INODE_VALUES[field_name]))})
    if kind == "child+":
        entry = (draw(st.sampled_from(_NAMES)), draw(st.integers(0, 19)))
        return lambda t: t.inodes[ino - 1].children.append(entry)
    if kind == "child-":
        pos = draw(st.integers(0, 20))

        def drop(t: SpecTree) -> None:
            kids = t.inodes[ino - 1].children
            if kids:
                del kids[pos % len(kids)]
        return drop
    if kind == "chunks":
        picks = draw(st.lists(st.integers(0, 17), max_size=3))

        def rechunk(t: SpecTree) -> None:
            digests = sorted(t.chunks)
            t.inodes[ino - 1].chunks = [digests[i % len(digests)] for i in picks]
        return rechunk
    if kind == "placement":
        which = draw(st.integers(0, 17))
        field_name = draw(st.sampled_from(sorted(_PLACEMENT_VALUES)))
        value = draw(st.sampled_from(_PLACEMENT_VALUES[field_name]))

        def place(t: SpecTree) -> None:
            d = sorted(t.chunks)[which]
            t.chunks[d] = replace(t.chunks[d], **{field_name: value})
        return place
    params = BootstrapParams(chunk_size=draw(st.sampled_from([0, 1000, 32 * 1024, 64 * 1024,
                                                              16 * MiB, 32 * MiB])),
                             compression=draw(st.sampled_from([0, 1, 2, 255])))
    return lambda t: setattr(t, "params", params)


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(_writer_mutation(), min_size=1, max_size=3))
def test_writer_output_is_valid_or_rejected(mutations: list[Mutation]) -> None:
    """Whatever the input, write_bootstrap raises BuildError or writes what check() accepts."""
    t = sample_tree()
    for m in mutations:
        m(t)
    try:
        built = t.write()
    except BuildError:
        event("rejected")
        return
    event("accepted")
    b = Bootstrap.from_bytes(built.data)
    b.check()
    assert b.header.root_digest == built.root_digest
    assert sum(1 for _ in b.walk()) == b.header.count("dirents") + 1


# ---- check() and tampering ----------------------------------------------------------------


def test_check_passes_on_good_bootstraps() -> None:
    for t in (sample_tree(), _tiny(), SpecTree(), _many_chunk_file(5, 50)[0]):
        b = t.write().open()
        counts = b.check()
        assert counts["inodes"] == len(t.inodes)
        assert counts["chunks"] == len(t.chunks)
        assert counts["blobs"] == len(t.blob_data)


def test_body_tampering_is_an_integrity_error() -> None:
    built = sample_tree().write()
    b = built.open()
    rng = random.Random(11)
    positions = [off + rng.randrange(max(1, count * L.RECORD_SIZES[name]))
                 for name, (off, count) in b.header.tables.items() if count]
    positions += [L.HEADER_SIZE, len(built.data) - 1]
    for pos in positions:
        bad = bytearray(built.data)
        bad[pos] ^= 0x80
        try:
            tampered = Bootstrap.from_bytes(bytes(bad))
        except FormatError:  # pragma: no cover - the body is not read at open
            pytest.fail("opening should only read the header")
        with pytest.raises(IntegrityError, match="header checksum"):
            tampered.check()


def _inode_field_offset(b: Bootstrap, ino: int, field_offset: int) -> int:
    return table_offset(b, "inodes", ino - 1) + field_offset


def test_stored_digest_tampering_fails_the_merkle_check() -> None:
    built = sample_tree().write()
    b = built.open()
    for ino in range(1, b.inode_count + 1):
        bad = bytearray(built.data)
        bad[_inode_field_offset(b, ino, 80 + ino % 32)] ^= 0x01  # the digest field
        tampered = Bootstrap.from_bytes(fix_checksum(bad))
        with pytest.raises(IntegrityError, match="Merkle"):
            tampered.check()


@pytest.mark.parametrize(
    ("what", "ino", "field_offset", "fmt", "value"),
    [("uid", 7, 8, "<I", 1), ("gid", 7, 12, "<I", 7), ("mode", 7, 0, "<I", R | 0o600),
     ("mtime_nsec", 11, 32, "<I", 7), ("mtime_sec", 2, 24, "<q", -5), ("rdev", 13, 40, "<Q", 9),
     ("size of a regular file", 8, 16, "<Q", 0), ("nlink", 10, 4, "<I", 3)],
)
def test_attribute_tampering_fails_the_merkle_check(
    what: str, ino: int, field_offset: int, fmt: str, value: int
) -> None:
    built = sample_tree().write()
    b = built.open()
    pos = _inode_field_offset(b, ino, field_offset)
    bad = bytearray(built.data)
    old = struct.unpack_from(fmt, bad, pos)[0]
    if old == value:
        value += 1
    struct.pack_into(fmt, bad, pos, value)
    tampered = Bootstrap.from_bytes(fix_checksum(bad))
    if what in ("nlink", "size of a regular file"):
        # Recounted from the dirents / chunk list before the Merkle pass: a structural error.
        with pytest.raises(FormatError):
            tampered.check()
        return
    with pytest.raises(IntegrityError, match="Merkle"):
        tampered.check()


def test_content_tampering_fails_the_merkle_check() -> None:
    built = sample_tree().write()
    b = built.open()
    strings_off = b.header.tables["strings"][0]
    sh = b.resolve(b"/usr/bin/sh")
    cases: dict[str, int] = {}
    # An xattr value byte (the capability), a symlink target byte, a chunk digest byte.
    for i in range(sh.xattr_index, sh.xattr_index + sh.xattr_count):
        name_off, value_off, name_len, _ = struct.unpack_from(
            "<QQII", built.data, table_offset(b, "xattrs", i))
        if built.data[strings_off + name_off : strings_off + name_off + name_len] == (
                b"security.capability"):
            cases["xattr value"] = strings_off + value_off + 5
    lt = b.resolve(b"/etc/localtime")
    cases["symlink target"] = strings_off + lt.data_index + 3
    cases["chunk digest"] = table_offset(b, "chunks", 3) + 31  # keeps the table sorted
    assert len(cases) == 3
    undetected = []
    for what, pos in cases.items():
        bad = bytearray(built.data)
        bad[pos] ^= 0x01
        try:
            Bootstrap.from_bytes(fix_checksum(bad)).check()
        except IntegrityError as exc:
            assert "Merkle" in str(exc), what
        else:
            undetected.append(what)
    assert undetected == []


def test_name_tampering_fails_the_merkle_check() -> None:
    t = SpecTree()
    t.file(1, b"aaaa", [b"1"])
    t.file(1, b"zzzz", [b"2"])
    built = t.write()
    b = built.open()
    strings_off = b.header.tables["strings"][0]
    bad = bytearray(built.data)
    pos = built.data.index(b"zzzz", strings_off)
    bad[pos + 3] = ord("y")  # "zzzy" still sorts after "aaaa"
    tampered = Bootstrap.from_bytes(fix_checksum(bad))
    assert tampered.lookup(1, b"zzzy") is not None
    with pytest.raises(IntegrityError, match="Merkle"):
        tampered.check()


def test_header_root_digest_tampering() -> None:
    built = sample_tree().write()
    bad = bytearray(built.data)
    bad[168] ^= 0x01  # root_digest: covered by the checksum, and by the Merkle check
    with pytest.raises(IntegrityError, match="checksum"):
        Bootstrap.from_bytes(bytes(bad)).check()
    with pytest.raises(IntegrityError, match="root digest"):
        Bootstrap.from_bytes(fix_checksum(bad)).check()


def test_structural_tampering_with_fixed_body_is_a_format_error() -> None:
    t = SpecTree()
    t.file(1, b"a", [b"1"])
    t.file(1, b"b", [b"2"])
    built = t.write()
    b = built.open()
    bad = bytearray(built.data)
    first, second = table_offset(b, "dirents", 0), table_offset(b, "dirents", 1)
    bad[first:first + 16], bad[second:second + 16] = bad[second:second + 16], bad[first:first + 16]
    with pytest.raises(FormatError, match="not sorted"):
        Bootstrap.from_bytes(fix_checksum(bad)).check()


# ---- the full filesystem tree, through the writer -----------------------------------------


def test_full_tree_fixture_is_complete(full_tree_info: FullTreeInfo) -> None:
    info = full_tree_info
    snap = snapshot_tree(info.root)
    types = {v["type"] for v in snap.values()}
    assert types == {"dir", "reg", "lnk", "chr", "blk", "fifo", "sock"}
    assert info.deep_depth >= DEEP_DEPTH and len(info.deep_dir) > 4096
    assert snap[info.deep_dir + b"/bottom.txt"]["xattrs"] or "user" not in info.xattr_kinds
    hl = [snap[p] for p in info.hardlinks]
    assert len({p.rsplit(b"/", 1)[0] for p in info.hardlinks}) == 3
    assert all(h["nlink"] == 3 and h["link_group"] == hl[0]["link_group"] for h in hl)
    assert snap[info.symlink_hardlinks[0]]["link_group"] == snap[info.symlink_hardlinks[1]][
        "link_group"]
    a, b = (snap[p] for p in info.dedup_pair)
    assert a["sha256"] == b["sha256"] and a["link_group"] != b["link_group"]
    for p in info.big_files:
        assert snap[p]["size"] >= 2 * MiB
    assert len({snap[p]["sha256"] for p in info.big_files}) == len(info.big_files)
    assert info.sparse_has_holes and snap[info.sparse_file]["size"] == 10 * MiB + 3
    assert {(snap[p]["type"], snap[p]["rdev"]) for p in info.devices} >= {
        ("chr", 0x0103), ("blk", 0x0800)}
    assert snap[info.fifo]["type"] == "fifo" and snap[info.sock]["type"] == "sock"
    modes = {stat.S_IMODE(v["mode"]) for v in snap.values()}
    assert {0o4755, 0o2755, 0o1777, 0o7777, 0o000} <= modes
    assert {(v["uid"], v["gid"]) for v in snap.values()} >= {(1000, 1000), (65534, 65534),
                                                             (123456, 654321)}
    names = {p.rsplit(b"/", 1)[1] for p in snap if p != b"/"}
    assert b"\xff\xfe" in names and b"new\nline" in names and b"L" * 255 in names
    assert info.xattr_kinds | info.xattr_refused == {"user", "trusted", "security"}
    seen_kinds = {n.split(b".", 1)[0].decode() for v in snap.values() for n, _ in v["xattrs"]}
    assert seen_kinds == info.xattr_kinds
    if "security" in info.xattr_kinds:
        assert (b"security.capability", struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)) in (
            snap[info.paths["xattr_cap"]]["xattrs"])
    # mtimes: every one was set explicitly (none is "now"); directories after their contents.
    special = {0, -1_500_000_000, 4_102_444_800_987_654_321, 1_600_000_000 * 10**9}
    for p, v in snap.items():
        ns = v["mtime_ns"]
        assert ns in special or (1_700_000_000 * 10**9 < ns < 1_700_010_000 * 10**9
                                 and ns % 10**9), p
    assert snap[b"/files/pre_epoch"]["mtime_ns"] == -1_500_000_000


def _bootstrap_from_tree(root: Path, snap: Snapshot) -> tuple[SpecTree, dict[bytes, int]]:
    """A minimal reference 'builder' from a snapshot: 1 MiB fixed chunks, walk order inos."""
    t = SpecTree()
    inos: dict[bytes, int] = {}
    groups: dict[bytes, int] = {}
    for path in sorted(snap):  # a directory sorts before everything under it
        v = snap[path]
        ns: int = v["mtime_ns"]
        spec = InodeSpec(v["mode"], uid=v["uid"], gid=v["gid"], mtime_sec=ns // 10**9,
                         mtime_nsec=ns % 10**9, xattrs=dict(v["xattrs"]))
        if path == b"/":
            spec.children = t.inodes[0].children
            t.inodes[0] = spec
            inos[path] = 1
            continue
        parent_path, name = path.rsplit(b"/", 1)
        parent = inos[parent_path or b"/"]
        group = v.get("link_group")
        if isinstance(group, bytes) and group in groups:
            t.link(parent, name, groups[group])
            inos[path] = groups[group]
            continue
        if v["type"] == "reg":
            data = read_file_at(root, path)
            spec.chunks = [t.add_chunk(data[i : i + MiB]) for i in range(0, len(data), MiB)]
            spec.size = len(data)
        elif v["type"] == "lnk":
            spec.target = v["target"]
        elif v["type"] in ("chr", "blk"):
            spec.rdev = v["rdev"]
        inos[path] = t.add(parent, name, spec)
        if isinstance(group, bytes):
            groups[group] = inos[path]
    return t, inos


def test_full_tree_round_trips_through_the_writer(full_tree_info: FullTreeInfo) -> None:
    snap = snapshot_tree(full_tree_info.root)
    t, inos = _bootstrap_from_tree(full_tree_info.root, snap)
    built = t.write()
    b = built.open()
    counts = b.check()
    assert counts["inodes"] == len(t.inodes)
    walked = {p: n for p, n in b.walk()}
    assert set(walked) == set(snap)
    by_ino: dict[int, set[bytes]] = {}
    for path, v in snap.items():
        node = walked[path]
        assert node.ino == inos[path]
        by_ino.setdefault(node.ino, set()).add(path)
        assert node.mode == v["mode"], path
        assert (node.uid, node.gid, node.mtime_ns) == (v["uid"], v["gid"], v["mtime_ns"]), path
        assert node.nlink == v["nlink"], path
        assert tuple((x.name, x.value) for x in b.xattrs(node)) == v["xattrs"], path
        if v["type"] != "dir":
            assert node.size == v["size"], path
        if v["type"] in ("chr", "blk"):
            assert node.rdev == v["rdev"]
        if v["type"] == "lnk":
            assert b.readlink(node) == v["target"]
        if v["type"] == "reg":
            assert hashlib.sha256(t.read_file(b, node.ino)).hexdigest() == v["sha256"], path
    for paths in by_ino.values():
        assert len({snap[p].get("link_group", p) for p in paths}) == 1
    assert len(by_ino) == len(t.inodes)
    # Dedup: the identical pair shares its chunks; the big random files share none.
    info = full_tree_info
    pair = [b.file_chunks(walked[p]) for p in info.dedup_pair]
    assert [r.chunk for r in pair[0]] == [r.chunk for r in pair[1]] and len(pair[0]) == 2
    big_chunks = [c.chunk.digest for p in info.big_files for c in b.file_chunks(walked[p])]
    assert len(big_chunks) == len(set(big_chunks)) == 4 + 2 + 5
    assert b.resolve(info.deep_dir + b"/bottom.txt").uid == 1000
