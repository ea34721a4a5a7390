"""``Bootstrap.listdir``, the one-pass listing, agrees with ``readdir`` + ``inode`` exactly.

The fast path validates the same records in the same order, so on any bootstrap, valid or
mutated, it must return what the per-entry path returns or raise the very same
``FormatError``. The mutations are the reader fuzz test's (``test_reader_fuzz``), aimed at the
tables a listing reads.
"""

from __future__ import annotations

import pytest
from hypothesis import given

from nydusfs.errors import FormatError
from nydusfs.format.reader import Bootstrap

from .test_reader_fuzz import BASE, FUZZ, mutated

Row = tuple[bytes, int, int]


def _slow(b: Bootstrap, ino: int, start: int) -> list[Row] | str:
    """What the per-entry accessors give, interleaved as a listing reads them; or the error."""
    try:
        return [(e.name, e.ino, b.inode(e.ino).mode) for e in b.readdir(ino, start)]
    except FormatError as exc:
        return f"FormatError: {exc}"


def _fast(b: Bootstrap, ino: int, start: int) -> list[Row] | str:
    try:
        listing = b.listdir(ino, start)
    except FormatError as exc:
        return f"FormatError: {exc}"
    assert len(listing) == len(listing.names) == len(listing.inos) == len(listing.modes)
    return list(zip(listing.names, listing.inos, listing.modes, strict=True))


def _agree(b: Bootstrap) -> int:
    """Compare both paths on every inode (directory or not) at a few offsets; count listings."""
    listed = 0
    for ino in range(0, min(b.inode_count, 500) + 2):  # 0 and count + 1: out of range
        for start in (0, 1, 3, -2, 10**6):
            slow, fast = _slow(b, ino, start), _fast(b, ino, start)
            assert fast == slow, (ino, start)
            listed += isinstance(fast, list) and bool(fast)
    return listed


def test_valid_bootstrap_lists_like_readdir() -> None:
    b = Bootstrap.from_bytes(BASE)
    assert _agree(b) > 5
    root = b.listdir(1)
    assert root.names == sorted(root.names) and len(root) == len(list(b.readdir(1)))
    regular = next(i for i in range(1, b.inode_count + 1) if b.inode(i).is_reg())
    with pytest.raises(FormatError, match="not a directory"):
        b.listdir(regular)


@FUZZ
@given(mutated(("dirents", "inodes", "strings")))
def test_mutated_bootstraps_fail_the_same_way(data: bytes) -> None:
    try:
        b = Bootstrap.from_bytes(data)
    except FormatError:
        return
    _agree(b)
