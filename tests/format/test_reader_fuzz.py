"""Hostile bootstraps: the reader may only ever raise FormatError (or FileNotFoundError).

A valid bootstrap from the writer (``sample_tree``: every inode type, chunks in two blobs,
hardlinks, xattrs, prefetch) is mutated: bytes flipped, u8..u64 fields overwritten with
boundary values, truncated, spliced; anywhere, and inside the header and each table
specifically; sometimes with the header checksum recomputed so ``check`` gets past its first test.
Then every reader API is exercised, through ``from_bytes`` and through ``Bootstrap.open`` on a
file. Anything but ``FormatError`` (``IntegrityError`` included) and ``FileNotFoundError`` from
``resolve`` fails the test: no IndexError, struct.error, ValueError, OverflowError,
RecursionError, MemoryError, BufferError on close...
"""

from __future__ import annotations

import contextlib
import itertools
import re
import stat
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydusfs.errors import FormatError
from nydusfs.format import layout as L
from nydusfs.format.reader import Bootstrap
from nydusfs.format.records import Dirent, Inode

from . import SpecTree, sample_tree

T = TypeVar("T")

BASE = sample_tree().write().data
_BASE_B = Bootstrap.from_bytes(BASE)
BASE_DIGESTS = [c.digest for c in _BASE_B.chunks()]
BASE_PATHS = [p for p, _ in _BASE_B.walk()]
REGIONS: dict[str, tuple[int, int]] = {"header": (0, L.HEADER_SIZE)}
for _name, (_off, _count) in _BASE_B.header.tables.items():
    REGIONS[_name] = (_off, _off + _count * L.RECORD_SIZES[_name])
assert all(end > start for start, end in REGIONS.values()), "every table must be non-empty"

WALK_LIMIT = 20_000  # entries; a hostile DAG may not make walk() run (or grow) without bound
FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])


def _fields(fmt: str) -> list[tuple[int, int]]:
    """(offset, size) of every field of a little-endian struct format (``16Q`` = 16 fields)."""
    out: list[tuple[int, int]] = []
    off = 0
    for count_s, code in re.findall(r"(\d*)([a-zA-Z?])", fmt.lstrip("<")):
        count = int(count_s or 1)
        if code == "s":
            out.append((off, count))
            off += count
            continue
        size = struct.calcsize("<" + code)
        for _ in range(count):
            out.append((off, size))
            off += size
    assert off == struct.calcsize(fmt)
    return out


RECORD_FIELDS: dict[str, tuple[int, list[tuple[int, int]]]] = {
    "header": (L.HEADER_SIZE, _fields(L.HEADER.format)),
    "inodes": (L.INODE.size, _fields(L.INODE.format)),
    "dirents": (L.DIRENT.size, _fields(L.DIRENT.format)),
    "chunkrefs": (L.CHUNKREF.size, _fields(L.CHUNKREF.format)),
    "chunks": (L.CHUNK.size, _fields(L.CHUNK.format)),
    "blobs": (L.BLOB.size, _fields(L.BLOB.format)),
    "xattrs": (L.XATTR.size, _fields(L.XATTR.format)),
    "prefetch": (L.PREFETCH.size, _fields(L.PREFETCH.format)),
    "strings": (1, [(0, 1)]),
}


def _boundaries(size: int) -> list[int]:
    top = (1 << (8 * size)) - 1
    vals = {0, 1, 2, 3, 7, 8, 255, top, top >> 1, (top >> 1) + 1, top - 1}
    for bits in (8, 16, 31, 32, 63):
        if bits < 8 * size:
            vals |= {(1 << bits) - 1, 1 << bits, (1 << bits) + 1}
    # Values that are plausible offsets/counts/sizes in this file.
    vals |= {v & top for v in (len(BASE), len(BASE) - 1, len(BASE) + 1, L.HEADER_SIZE,
                                _BASE_B.inode_count, _BASE_B.inode_count + 1, 4096, 65536)}
    return sorted(vals)


def fix_checksum(data: bytes | bytearray) -> bytes:
    out = bytearray(data)
    if len(out) >= L.HEADER_SIZE:
        out[200:232] = L.bootstrap_checksum(out)
    return bytes(out)


# ---- exercising every API -----------------------------------------------------------------


def _try(fn: Callable[..., T], *args: object) -> T | None:
    """Call ``fn(*args)``; a FormatError is an acceptable answer (None), nothing else is."""
    try:
        return fn(*args)
    except FormatError:
        return None


def _walk(b: Bootstrap) -> list[tuple[bytes, Inode]]:
    out: list[tuple[bytes, Inode]] = []
    try:
        for item in itertools.islice(b.walk(), WALK_LIMIT):
            out.append(item)
    except FormatError:
        pass
    return out


def _resolve(b: Bootstrap, path: bytes) -> None:
    with contextlib.suppress(FormatError, FileNotFoundError):
        b.resolve(path)


def exercise(b: Bootstrap) -> bool:
    """Call every reader API on ``b``; return whether ``check()`` accepted it."""
    h = b.header
    assert h.cdc in (True, False)
    for table in L.TABLES:
        assert h.count(table) >= 0
    n = b.inode_count
    assert b.chunk_count == h.count("chunks") and b.blob_count == h.count("blobs")

    inodes = range(0, min(n, 2000) + 2)  # 0 and n + 1 are out of range on purpose
    for ino in inodes:
        node = _try(b.inode, ino)
        entries: list[Dirent] | None = _try(list, b.readdir(ino))  # iterated inside _try
        _try(list, b.readdir(ino, start=1))
        _try(b.readlink, ino)
        _try(b.xattrs, ino)
        _try(b.getxattr, ino, b"security.capability")
        _try(b.file_chunks, ino)
        for off, size in ((0, 1), (0, 2**64), (1000, 5000), (2**63, 1), (0, 0), (4999, 2)):
            _try(b.chunks_for_range, ino, off, size)
        names = [e.name for e in entries or []][:50]
        for entry_name in [*names, b"", b"zzz", b"\xff" * 300]:
            _try(b.lookup, ino, entry_name)
        if node is not None:  # the Inode-object overloads
            _try(list, b.readdir(node))
            _try(b.readlink, node)
            _try(b.xattrs, node)
            _try(b.file_chunks, node)
            _try(b.chunks_for_range, node, 10, 100)

    walked = _walk(b)
    for path in [p for p, _ in walked][:300] + BASE_PATHS + [b"/", b"", b"/nope", b"//a/./b/.."]:
        _resolve(b, path)

    for i in range(min(h.count("dirents"), 4000) + 1):
        _try(b.dirent, i)
    for i in range(min(h.count("chunkrefs"), 4000) + 1):
        _try(b.chunkref, i)
    found = []
    for i in range(min(h.count("chunks"), 4000) + 1):
        c = _try(b.chunk, i)
        if c is not None:
            found.append(c.digest)
    for i in range(min(h.count("blobs"), 4000) + 1):
        _try(b.blob, i)
    _try(b.blobs)
    _try(list, b.chunks())
    for d in [*BASE_DIGESTS, *found[:50], bytes(32), b"\xff" * 32, b""]:
        _try(b.find_chunk, d)
    _try(b.prefetch)
    ok = _try(b.check) is not None
    if ok:
        _consistent_after_check(b)
    return ok


def _consistent_after_check(b: Bootstrap) -> None:
    """``check()`` accepted ``b``: then no accessor may fail on well-typed requests."""
    walked = list(b.walk())
    reachable = {node.ino for _, node in walked}
    assert reachable == set(range(1, b.inode_count + 1))
    for path, node in walked:
        assert b.resolve(path).ino == node.ino
        b.xattrs(node)
        if node.is_dir():
            for e in b.readdir(node):
                assert b.lookup(node, e.name) == e
        elif node.is_reg():
            refs = b.file_chunks(node)
            assert b.chunks_for_range(node, 0, node.size) == (refs if node.size else [])
        elif node.is_symlink():
            assert len(b.readlink(node)) == node.size
    for c in b.chunks():
        assert b.find_chunk(c.digest) == c
    b.blobs()
    b.prefetch()


def check_bytes(data: bytes, path: Path) -> None:
    """Open ``data`` both ways; every API may only raise FormatError."""
    b = _try(Bootstrap.from_bytes, data)
    if b is not None:
        exercise(b)
    path.write_bytes(data)
    try:
        mapped = Bootstrap.open(path)
    except FormatError:
        assert b is None or len(data) == 0, "open() and from_bytes() disagree"
        return
    assert b is not None, "open() accepted what from_bytes() refused"
    with mapped:  # close() must not fail (BufferError if a view of the map leaked)
        exercise(mapped)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "bootstrap"


# ---- the unmutated bootstrap --------------------------------------------------------------


def test_base_bootstrap_is_fully_valid(scratch: Path) -> None:
    b = Bootstrap.from_bytes(BASE)
    assert exercise(b) is True
    assert len(BASE_PATHS) == 20 and len(BASE_DIGESTS) == 18
    check_bytes(BASE, scratch)


# ---- mutation strategies ------------------------------------------------------------------

Mutator = Callable[[bytearray], None]


@st.composite
def _field_overwrite(draw: st.DrawFn, region: str) -> Mutator:
    start, end = REGIONS[region]
    rec_size, fields = RECORD_FIELDS[region]
    index = draw(st.integers(0, (end - start) // rec_size - 1))
    off, size = draw(st.sampled_from(fields))
    pos = start + index * rec_size + off
    if size in (1, 2, 4, 8):
        value = draw(st.sampled_from(_boundaries(size)) | st.integers(0, (1 << (8 * size)) - 1))
        raw = value.to_bytes(size, "little")
    else:  # digests, magic, reserved areas
        raw = draw(st.sampled_from([bytes(size), b"\xff" * size]) |
                   st.binary(min_size=size, max_size=size))

    def apply(buf: bytearray) -> None:
        buf[pos : pos + size] = raw
    return apply


@st.composite
def _flip(draw: st.DrawFn, start: int, end: int) -> Mutator:
    pos = draw(st.integers(start, end - 1))
    mask = draw(st.integers(1, 255))

    def apply(buf: bytearray) -> None:
        if pos < len(buf):
            buf[pos] ^= mask
    return apply


@st.composite
def _overwrite_bytes(draw: st.DrawFn, start: int, end: int) -> Mutator:
    pos = draw(st.integers(start, end - 1))
    raw = draw(st.binary(min_size=1, max_size=16))

    def apply(buf: bytearray) -> None:
        buf[pos : pos + len(raw)] = raw[: max(0, len(buf) - pos)]
    return apply


def _mutators(region: str) -> st.SearchStrategy[Mutator]:
    start, end = REGIONS[region]
    return st.one_of(_field_overwrite(region), _flip(start, end), _overwrite_bytes(start, end))


@st.composite
def mutated(draw: st.DrawFn, regions: tuple[str, ...]) -> bytes:
    buf = bytearray(BASE)
    for m in draw(st.lists(st.one_of(*[_mutators(r) for r in regions]), min_size=1,
                           max_size=4)):
        m(buf)
    if draw(st.booleans()):
        return fix_checksum(buf)
    return bytes(buf)


# ---- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("region", sorted(REGIONS))
def test_mutations_inside_one_region(region: str, scratch: Path) -> None:
    @settings(FUZZ, max_examples=200)  # x 9 regions
    @given(data=mutated((region,)))
    def run(data: bytes) -> None:
        check_bytes(data, scratch)

    run()


@FUZZ
@given(data=mutated(tuple(REGIONS)))
def test_mutations_anywhere(data: bytes, scratch: Path) -> None:
    check_bytes(data, scratch)


@FUZZ
@given(
    pos=st.integers(0, len(BASE)),
    flips=st.lists(st.tuples(st.integers(0, len(BASE) - 1), st.integers(1, 255)), max_size=8),
    fix=st.booleans(),
)
def test_random_byte_flips(pos: int, flips: list[tuple[int, int]], fix: bool,
                           scratch: Path) -> None:
    buf = bytearray(BASE)
    for p, mask in flips:
        buf[p] ^= mask
    check_bytes(fix_checksum(buf) if fix else bytes(buf), scratch)


@FUZZ
@given(length=st.integers(0, len(BASE)), fix=st.booleans())
def test_truncation(length: int, fix: bool, scratch: Path) -> None:
    data = BASE[:length]
    check_bytes(fix_checksum(data) if fix else data, scratch)


@FUZZ
@given(
    pos=st.integers(0, len(BASE)),
    cut=st.integers(0, 64),
    insert=st.binary(max_size=64),
    fix=st.booleans(),
)
def test_splice(pos: int, cut: int, insert: bytes, fix: bool, scratch: Path) -> None:
    data = BASE[:pos] + insert + BASE[pos + cut :]
    check_bytes(fix_checksum(data) if fix else data, scratch)


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(data: bytes, scratch: Path) -> None:
    check_bytes(data, scratch)


@FUZZ
@given(body=st.binary(min_size=len(BASE) - L.HEADER_SIZE, max_size=len(BASE) - L.HEADER_SIZE),
       fix=st.booleans())
def test_random_body_behind_a_valid_header(body: bytes, fix: bool, scratch: Path) -> None:
    data = BASE[: L.HEADER_SIZE] + body
    check_bytes(fix_checksum(data) if fix else data, scratch)


@FUZZ
@given(
    descriptors=st.lists(st.sampled_from(_boundaries(8)) | st.integers(0, 2 * len(BASE)),
                         min_size=16, max_size=16),
)
def test_random_table_descriptors(descriptors: list[int], scratch: Path) -> None:
    buf = bytearray(BASE)
    struct.pack_into("<16Q", buf, 40, *descriptors)
    check_bytes(bytes(buf), scratch)


def test_empty_and_tiny_inputs(scratch: Path) -> None:
    for data in (b"", b"\x00", L.MAGIC, BASE[: L.HEADER_SIZE - 1], BASE[: L.HEADER_SIZE]):
        with pytest.raises(FormatError):
            Bootstrap.from_bytes(data)
        check_bytes(data, scratch)


# ---- depth --------------------------------------------------------------------------------


def _chain(depth: int) -> tuple[bytes, bytes]:
    t = SpecTree()
    parent = 1
    for _ in range(depth):
        parent = t.mkdir(parent, b"d")
    t.file(parent, b"leaf", [b"deep"])
    built = t.write()
    return built.data, b"/d" * depth + b"/leaf"


def test_walk_and_check_at_depth_5000() -> None:
    depth = 5000
    assert depth > sys.getrecursionlimit()
    data, leaf = _chain(depth)
    b = Bootstrap.from_bytes(data)
    entries = list(b.walk())
    assert len(entries) == depth + 2
    assert entries[-1][0] == leaf
    assert entries[-1][1].is_reg()
    assert [len(p.split(b"/")) - 1 for p, _ in entries[1:-1]] == list(range(1, depth + 1))
    assert b.resolve(leaf).ino == depth + 2
    assert b.check()["directories"] == depth + 1


def _inode_offset(b: Bootstrap, ino: int, field_offset: int = 0) -> int:
    return b.header.tables["inodes"][0] + L.INODE.size * (ino - 1) + field_offset


def _shared_dirents(n_dirs: int, n_dirents: int, *, self_loop: bool) -> bytes:
    """Directories whose records all point at one run of ``n_dirents`` dirents.

    Structurally invalid (``check`` refuses it; the writer refuses to produce anything like
    it), so it is made by patching the bytes of a valid bootstrap: the directories' inode
    records are pointed at the first directory's dirent run, and the header checksum recomputed so
    only structure gives it away. With ``self_loop`` the run's first entry is also re-pointed
    at the last directory, so every visit of the run reaches a directory again.
    """
    t = SpecTree()
    dirs = [t.mkdir(1, b"d%05d" % i) for i in range(n_dirs)]
    f = t.file(dirs[0], b"f", [])
    for i in range(n_dirents - 1):
        t.link(dirs[0], b"f%05d" % i, f)  # one inode with many names keeps the file small
    buf = bytearray(t.write().data)
    b = Bootstrap.from_bytes(bytes(buf))
    src = b.inode(dirs[0])
    assert src.data_count == n_dirents
    for ino in dirs[1:]:
        struct.pack_into("<QI", buf, _inode_offset(b, ino, 48), src.data_index, src.data_count)
    if self_loop:
        first = b.header.tables["dirents"][0] + L.DIRENT.size * src.data_index
        assert b.dirent(src.data_index).name == b"f"  # sorts first in the run
        struct.pack_into("<HI", buf, first + 10, stat.S_IFDIR >> 12, dirs[-1])
    return fix_checksum(buf)


def _iter_bounded(it: Iterator[tuple[bytes, Inode]], limit: int) -> int:
    """Entries ``it`` yields (at most ``limit``) before it ends or raises FormatError."""
    n = 0
    try:
        for _ in itertools.islice(it, limit):
            n += 1
    except FormatError:
        pass
    return n


def _count_calls(monkeypatch: pytest.MonkeyPatch, b: Bootstrap, method: str) -> list[int]:
    calls = [0]
    real = getattr(b, method)

    def counting(*args: object) -> object:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(b, method, counting)
    return calls


# Regression (nydusfs/format/reader.py, Bootstrap.walk): the old cycle guard counted directory
# *visits*, and every visit decoded and pushed all of the directory's entries. Directory records
# may share a dirent run (only check() forbids it), so walk() did inode_count x dirent_count work
# and held that many entries on its stack: a crafted 169 KB bootstrap took ~2 GB and ~2 minutes.
# walk() may yield at most one path per dirent (plus the root) and decode O(inodes + dirents)
# inodes, whatever the bytes say.
#
# STILL FAILING for self_loop=False (nydusfs/format/reader.py, Bootstrap.walk): the fix expands
# each directory once, which stops a run that reaches a directory again (self_loop=True), but
# N directories sharing one run of M *non-directory* entries are still each expanded: walk()
# yields N x M paths from N + M records (here 100 x 500 = 50,101 paths from 600 dirents; a
# 354 KB bootstrap with 1,000 x 10,000 yields 10,001,001 paths and takes ~60 s; a caller doing
# list(walk()) holds them all). The docstring's "at most O(inodes + dirents) work" is not true.
# Possible fix: a budget of dirents, e.g. fail when the total data_count of expanded
# directories exceeds the dirents count (in a valid bootstrap the runs are disjoint), or keep
# the expanded (data_index, data_count) runs and refuse an overlap.
@pytest.mark.parametrize("self_loop", [True, False], ids=["self-loop", "no-loop"])
def test_walk_work_is_linear_in_the_bootstrap(monkeypatch: pytest.MonkeyPatch,
                                              self_loop: bool) -> None:
    data = _shared_dirents(100, 500, self_loop=self_loop)
    b = Bootstrap.from_bytes(data)
    work = _count_calls(monkeypatch, b, "inode")
    yielded = _iter_bounded(b.walk(), 1_000_000)
    assert yielded <= b.header.count("dirents") + 1, (
        f"walk yielded {yielded} paths from {b.header.count('dirents')} dirents")
    bound = 4 * (b.inode_count + b.header.count("dirents"))
    assert work[0] <= bound, f"walk decoded {work[0]} inodes for a {len(data)}-byte bootstrap"


# Regression (nydusfs/format/reader.py, Bootstrap.check): when directory records shared one
# dirent run, check() decoded the run once per directory before any test failed (n_dirs x
# n_dirents dirent decodes): a crafted 177 KB bootstrap took 5.5 s. The header checksum is no
# defence: anyone can recompute it.
@pytest.mark.parametrize("self_loop", [True, False], ids=["self-loop", "no-loop"])
def test_check_work_is_linear_in_the_bootstrap(monkeypatch: pytest.MonkeyPatch,
                                               self_loop: bool) -> None:
    data = _shared_dirents(100, 1000, self_loop=self_loop)
    b = Bootstrap.from_bytes(data)
    work = _count_calls(monkeypatch, b, "dirent")
    with pytest.raises(FormatError):
        b.check()
    bound = 4 * (b.inode_count + b.header.count("dirents"))
    assert work[0] <= bound, f"check decoded {work[0]} dirents for a {len(data)}-byte bootstrap"


def test_walk_stops_on_shared_dirents_eventually() -> None:
    """Whatever the cost, walk() ends with FormatError, never another exception."""
    b = Bootstrap.from_bytes(_shared_dirents(2, 50, self_loop=True))
    with pytest.raises(FormatError, match=r"reached twice|share entries"):
        list(b.walk())
    with pytest.raises(FormatError, match="overlap"):
        b.check()


def _two_of_each() -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Valid bootstrap with two directories, two files, each with a 3-record run in every table.

    Returns the bytes and, per table, the (first, second) owning inode numbers.
    """
    t = SpecTree()
    a = t.mkdir(1, b"a")
    b = t.mkdir(1, b"b")
    for d in (a, b):
        for name in (b"x", b"y", b"z"):
            t.special(d, name, stat.S_IFIFO | 0o600)
    xattrs = {b"user.1": b"1", b"user.2": b"2", b"user.3": b"3"}
    f = t.file(1, b"f", [b"one", b"two", b"six"])
    g = t.file(1, b"g", [b"ten", b"owl", b"cat"])
    t.inodes[f - 1].xattrs = dict(xattrs)
    t.inodes[g - 1].xattrs = dict(xattrs)
    return t.write().data, {"dirents": (a, b), "chunkrefs": (f, g), "xattrs": (f, g)}


@pytest.mark.parametrize("table", ["dirents", "chunkrefs", "xattrs"])
@pytest.mark.parametrize("shift", [0, 1, 2], ids=["same-run", "overlap-by-2", "overlap-by-1"])
def test_check_refuses_runs_shared_between_inodes(table: str, shift: int) -> None:
    data, owners = _two_of_each()
    base = Bootstrap.from_bytes(data)
    assert base.check()["inodes"] == 11
    first, second = (base.inode(i) for i in owners[table])
    buf = bytearray(data)
    if table == "xattrs":
        assert first.xattr_count == second.xattr_count == 3
        struct.pack_into("<Q", buf, _inode_offset(base, second.ino, 64),
                         first.xattr_index + shift)
    else:
        assert first.data_count == second.data_count == 3
        struct.pack_into("<Q", buf, _inode_offset(base, second.ino, 48),
                         first.data_index + shift)
    b = Bootstrap.from_bytes(fix_checksum(buf))
    with pytest.raises(FormatError, match=f"{table} overlap"):
        b.check()


def test_walk_refuses_a_directory_named_twice() -> None:
    t = SpecTree()
    a = t.mkdir(1, b"a")
    t.mkdir(1, b"b")
    t.file(a, b"f", [b"x"])
    built = t.write()
    b = Bootstrap.from_bytes(built.data)
    buf = bytearray(built.data)
    # Root's run is [a -> 2, b -> 3]: point b at a too (a DAG, not a cycle).
    struct.pack_into("<I", buf, b.header.tables["dirents"][0] + L.DIRENT.size + 12, a)
    b2 = Bootstrap.from_bytes(fix_checksum(buf))
    with pytest.raises(FormatError, match="reached twice"):
        list(itertools.islice(b2.walk(), 100))
    with pytest.raises(FormatError):
        b2.check()


def test_walk_survives_a_self_loop() -> None:
    """A directory whose entry names itself: walk() must stop with FormatError."""
    t = SpecTree()
    d = t.mkdir(1, b"d")
    t.mkdir(d, b"e")
    built = t.write()
    b = Bootstrap.from_bytes(built.data)
    dirent_off = b.header.tables["dirents"][0]
    buf = bytearray(built.data)
    # dirents: [root: d->2], [d: e->3]; point e back at d (ino 2).
    struct.pack_into("<I", buf, dirent_off + 16 + 12, d)
    b2 = Bootstrap.from_bytes(bytes(buf))
    with pytest.raises(FormatError):
        list(itertools.islice(b2.walk(), 100_000))
    with pytest.raises(FormatError):
        b2.check()
