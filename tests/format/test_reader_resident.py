"""A mapped bootstrap made resident: ``Bootstrap.loader`` + ``adopt``.

The copy must be the bytes that were mapped (same open file, checked against the header
checksum), and once adopted the file on disk no longer matters: rewriting or truncating it
changes nothing a reader sees.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from nydusfs.errors import FormatError, IntegrityError
from nydusfs.format.reader import Bootstrap

from . import sample_tree


def _everything(b: Bootstrap) -> tuple[object, ...]:
    """What a reader can get out of a bootstrap (records of every kind, the full check)."""
    walk = list(b.walk())
    xattrs = [(p, b.xattrs(n)) for p, n in walk]
    listings = [(p, b.listdir(n)) for p, n in walk if n.is_dir()]
    chunks = [(p, b.file_chunks(n)) for p, n in walk if n.is_reg()]
    return walk, xattrs, listings, chunks, b.check(), b.blobs(), b.prefetch()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "bootstrap"
    p.write_bytes(sample_tree().write().data)
    return p


def test_adopted_copy_reads_the_same_and_releases_the_mapping(path: Path) -> None:
    with Bootstrap.open(path) as b:
        want = _everything(b)
        mapping = b._buf
        assert not b.resident and isinstance(mapping, mmap.mmap)
        load = b.loader()
        assert load is not None
        data = load()
        assert data == path.read_bytes() and b.size == len(data)
        b.adopt(data)
        assert b.resident and mapping.closed
        assert b.loader() is None  # nothing left to load
        assert _everything(b) == want


def test_adopted_copy_survives_the_file_being_rewritten_or_truncated(path: Path) -> None:
    with Bootstrap.open(path) as b:
        want = _everything(b)
        load = b.loader()
        assert load is not None
        b.adopt(load())
        with open(path, "r+b") as f:  # in place: the same inode the mapping was of
            f.write(b"\0" * 4096)
            f.truncate(100)
        assert _everything(b) == want


def test_loader_reads_the_open_file_not_the_path(path: Path, tmp_path: Path) -> None:
    original = path.read_bytes()
    with Bootstrap.open(path) as b:
        other = tmp_path / "other"
        other.write_bytes(b"x" * len(original))
        os.replace(other, path)  # the path now names another file
        load = b.loader()
        assert load is not None
        assert load() == original


def test_loader_refuses_a_file_changed_since_it_was_mapped(path: Path) -> None:
    size = path.stat().st_size
    with Bootstrap.open(path) as b:
        with open(path, "r+b") as f:  # one byte past the header, in place
            f.seek(size - 1)
            last = f.read(1)
            f.seek(size - 1)
            f.write(bytes([last[0] ^ 0xFF]))
        load = b.loader()
        assert load is not None
        with pytest.raises(IntegrityError, match="checksum mismatch"):
            load()
        assert not b.resident
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        load = b.loader()
        assert load is not None
        with pytest.raises(FormatError, match="shrank"):
            load()
        assert not b.resident


def test_adopt_checks_size_and_header(path: Path) -> None:
    data = path.read_bytes()
    with Bootstrap.open(path) as b:
        with pytest.raises(FormatError, match="does not match"):
            b.adopt(data[:-8])
        with pytest.raises(FormatError, match="does not match"):
            b.adopt(b"\1" + data[1:])
        assert not b.resident


def test_a_loader_outlives_close_but_its_copy_is_not_adopted(path: Path) -> None:
    b = Bootstrap.open(path)
    load = b.loader()
    b.close()
    assert b.loader() is None
    assert load is not None
    data = load()  # its own descriptor: still the bootstrap's bytes
    assert data == path.read_bytes()
    with pytest.raises(FormatError, match="closed"):
        b.adopt(data)


def test_bytes_are_resident_already() -> None:
    b = Bootstrap.from_bytes(sample_tree().write().data)
    assert b.resident and b.loader() is None
