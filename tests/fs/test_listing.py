"""Directory listings through the FUSE adapter: names-only entries, the policy, the readahead.

``_ListingPolicy`` and ``_ListingReadahead`` are exercised directly (no mount: they are plain
objects over an ``ImageFS``); a real mount then checks what a walker sees either way: the
``d_ino``/``d_type`` of entries sent without attributes, and attributes equal to the source's
whether they came with the listing or from a LOOKUP afterwards.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from nydusfs.builder import BuildOptions, build
from nydusfs.format.reader import Bootstrap
from nydusfs.fs.fuse import FuseAdapter, _ListingPolicy, _ListingReadahead, _name_only_template
from nydusfs.fs.model import ImageFS
from nydusfs.storage.memory import MemoryBackend

from .conftest import MountFactory


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """a/{a0..a2}/{f0..f9}, b/{b0,b1}/f, c (a file), l -> c: depth-first order is known."""
    root = tmp_path_factory.mktemp("listing")
    src = root / "src"
    for sub in ("a0", "a1", "a2"):
        (src / "a" / sub).mkdir(parents=True)
        for i in range(10):
            (src / "a" / sub / f"f{i}").write_bytes(b"x" * i)
    for sub in ("b0", "b1"):
        (src / "b" / sub).mkdir(parents=True)
        (src / "b" / sub / "f").write_bytes(b"f")
    (src / "c").write_bytes(b"c" * 100)
    os.symlink("c", src / "l")
    build([str(src)], root / "image", BuildOptions())
    return src, root / "image"


def _adapter(image: Path) -> FuseAdapter:
    blobs = {p.name: p.read_bytes() for p in (image / "blobs").iterdir()}
    return FuseAdapter(ImageFS(Bootstrap.open(image / "bootstrap"), MemoryBackend(blobs)))


def _ino(adapter: FuseAdapter, path: str) -> int:
    ino = 1
    for part in path.split("/"):
        ino = adapter.fs.lookup(ino, part.encode()).ino
    return ino


def test_name_only_template_keeps_node_id_zero() -> None:
    made = _name_only_template()
    assert made is not None, "pyfuse3's EntryAttributes layout changed: listings lose names-only"
    template, st_ino = made
    st_ino.value = 12345
    template.st_mode = stat.S_IFREG | 0o644
    assert template.st_ino == 0  # the node id the kernel sees: no inode instantiated
    assert st_ino.value == 12345 and template.st_mode == stat.S_IFREG | 0o644


def test_policy_follows_what_readers_do_with_listings() -> None:
    p = _ListingPolicy()
    assert p.start_listing(10, 100) is False  # starts with names
    assert p.start_listing(11, 100) is False  # nothing looked up in 10: still names
    for _ in range(25):  # a quarter of 11's names looked up: readers stat what they list
        p.looked_up(11)
    p.looked_up(99)  # elsewhere: does not count
    assert p.start_listing(12, 0) is True  # decided; a listing of directories only is no probe
    sent = []
    for i in range(p.PROBE_EVERY * 2):  # a reader that stats everything it lists
        sent.append(p.start_listing(100 + i, 100))
        for _ in range(100):
            p.looked_up(100 + i)  # only names sent without attributes reach the daemon
    probes = [i for i, plus in enumerate(sent) if not plus]
    assert len(probes) == 2 and probes[1] - probes[0] == p.PROBE_EVERY  # 1 in PROBE_EVERY
    # A probe whose names nobody looks up (find): names from the next listing on.
    assert not all(p.start_listing(300, 100) for _ in range(p.PROBE_EVERY))  # a probe
    assert p.start_listing(301, 100) is False and p.plus is False


def test_readahead_decodes_the_walkers_next_listings_in_order(tree: tuple[Path, Path]) -> None:
    _, image = tree
    adapter = _adapter(image)
    a, b = _ino(adapter, "a"), _ino(adapter, "b")
    order = [_ino(adapter, p) for p in ("a", "a/a0", "a/a1", "a/a2", "b", "b/b0", "b/b1")]

    async def run(ahead: int) -> list[int]:
        ra: _ListingReadahead = adapter._ahead
        ra.AHEAD = ahead
        ra.listed(1, adapter._listing(1))
        for _ in range(100):  # bounded: the task ends once AHEAD listings wait unused
            if ra._task is None:
                break
            await asyncio.sleep(0)
        assert ra._task is None
        return [ino for ino in adapter._dirs if ino != 1]

    assert asyncio.run(run(3)) == order[:3]  # depth first, and no further than asked
    adapter._dirs.clear()
    assert asyncio.run(run(100)) == order  # all of it: leaves have no subdirectories
    assert a in adapter._dirs and b in adapter._dirs
    adapter.close()


def test_walkers_see_the_source_with_and_without_attributes(
    tree: tuple[Path, Path], nydus_mount: MountFactory
) -> None:
    src, image = tree
    m = nydus_mount(image)

    def scan(root: Path) -> dict[str, tuple[bool, bool, int]]:
        out: dict[str, tuple[bool, bool, int]] = {}
        stack = [root]
        while stack:
            d = stack.pop()
            with os.scandir(d) as it:
                for e in it:  # d_type and d_ino only: no stat
                    rel = os.path.relpath(e.path, root)
                    out[rel] = (e.is_dir(follow_symlinks=False),
                                e.is_symlink(), e.inode())
                    if e.is_dir(follow_symlinks=False):
                        stack.append(Path(e.path))
        return out

    def stats(root: Path, rels: list[str]) -> dict[str, tuple[int, int, int, int]]:
        return {r: (st.st_mode, st.st_size, st.st_nlink, st.st_mtime_ns)
                for r in rels for st in [os.lstat(root / r)]}

    for _ in range(2):  # the first walk stats nothing (names), then stats every entry
        got, want = scan(m.mnt), scan(src)
        assert {r: v[:2] for r, v in got.items()} == {r: v[:2] for r, v in want.items()}
        rels = sorted(got)
        assert stats(m.mnt, rels) == stats(src, rels)
        # d_ino is the image's inode number, the one stat reports too
        assert all(os.lstat(m.mnt / r).st_ino == got[r][2] for r in rels)
