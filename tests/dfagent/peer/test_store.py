"""The peer chunk store: atomic, checked on read, LRU at the quota, rebuilt on restart."""

from __future__ import annotations

import os
from pathlib import Path

from dfagent.peer.store import ChunkStore

from .helpers import chunk, run


def test_put_read_and_atomic_layout(tmp_path: Path) -> None:
    async def go() -> None:
        store = ChunkStore(tmp_path, 1 << 20)
        assert await store.open() == []
        c = chunk(3000)
        assert await store.put(c.digest, c.file) == []
        path = store.path_of(c.digest)
        assert path == tmp_path / "chunks" / c.digest[:2] / c.digest
        assert path.read_bytes() == c.file
        assert list((tmp_path / "tmp").iterdir()) == []  # nothing left half-written
        assert await store.read(c.digest) == c.file
        assert await store.read_verified(c.digest, len(c.data)) == c.file
        assert await store.read(chunk(10).digest) is None

    run(go())


def test_tampered_files_are_dropped_on_read(tmp_path: Path) -> None:
    async def go() -> None:
        store = ChunkStore(tmp_path, 1 << 20)
        await store.open()
        a, b = chunk(3000), chunk(3000)
        await store.put(a.digest, a.file)
        await store.put(b.digest, b.file)
        # a: payload damaged, header intact (only a full check sees it)
        pa = store.path_of(a.digest)
        raw = pa.read_bytes()
        pa.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))  # always a change
        assert await store.read(a.digest) is not None  # the structure check passes
        assert await store.read_verified(a.digest) is None
        assert a.digest not in store and not pa.exists()
        # b: truncated: the structure check alone catches it
        pb = store.path_of(b.digest)
        pb.write_bytes(pb.read_bytes()[:100])
        assert await store.read(b.digest) is None and b.digest not in store
        assert store.stats().corrupt == 2

    run(go())


def test_lru_eviction_at_the_quota(tmp_path: Path) -> None:
    async def go() -> None:
        cs = [chunk(1000) for _ in range(4)]
        size = len(cs[0].file)
        store = ChunkStore(tmp_path, 3 * size)
        await store.open()
        for c in cs[:3]:
            assert await store.put(c.digest, c.file) == []
        assert store.touch(cs[0].digest)  # used again: cs[1] is now the oldest
        assert await store.put(cs[3].digest, cs[3].file) == [cs[1].digest]
        assert not store.path_of(cs[1].digest).exists()
        assert set(store.digests()) == {cs[0].digest, cs[2].digest, cs[3].digest}
        assert store.total == 3 * size and store.stats().evictions == 1
        big = chunk(10_000)
        assert await store.put(big.digest, big.file) == []  # larger than the quota: not kept
        assert big.digest not in store

    run(go())


def test_restart_rebuilds_the_index(tmp_path: Path) -> None:
    async def go() -> None:
        cs = [chunk(500) for _ in range(3)]
        store = ChunkStore(tmp_path, 1 << 20)
        await store.open()
        for i, c in enumerate(cs):
            await store.put(c.digest, c.file)
            os.utime(store.path_of(c.digest), (1000 + i, 1000 + i))
        junk = tmp_path / "chunks" / "ab" / ("ab" + "0" * 62)  # a name with a bad header
        junk.parent.mkdir(exist_ok=True)
        junk.write_bytes(b"not a chunk file")
        (tmp_path / "tmp" / "left-over").write_bytes(b"x")
        stray = tmp_path / "chunks" / cs[0].digest[:2] / "notes.txt"
        stray.write_bytes(b"x")

        again = ChunkStore(tmp_path, 1 << 20)
        assert await again.open() == [c.digest for c in cs]  # oldest first
        assert not junk.exists() and not stray.exists()
        assert list((tmp_path / "tmp").iterdir()) == []
        assert again.total == sum(len(c.file) for c in cs)
        # a smaller quota on restart evicts the oldest
        small = ChunkStore(tmp_path, len(cs[0].file) * 2)
        assert await small.open() == [c.digest for c in cs[1:]]

    run(go())


def test_recent_chunks_are_served_from_memory_within_its_bound(tmp_path: Path) -> None:
    """The latest chunks stored are read back from memory (here their files are gone), at
    most ``memory`` bytes of them, oldest out first; with ``memory`` 0, from disk only."""

    async def go() -> None:
        cs = [chunk(3000) for _ in range(3)]
        size = len(cs[0].file)
        store = ChunkStore(tmp_path / "a", 10 * size, memory=2 * size)
        off = ChunkStore(tmp_path / "b", 10 * size)
        for st in (store, off):
            await st.open()
            for c in cs:
                await st.put(c.digest, c.file)
                st.path_of(c.digest).unlink()  # only memory can answer now
        assert await store.read(cs[0].digest) is None  # the oldest is out of memory
        assert await store.read(cs[1].digest) == cs[1].file
        assert await store.read(cs[2].digest) == cs[2].file
        assert [await off.read(c.digest) for c in cs] == [None, None, None]
        # A full check is of the file (what a co-located client read), not of memory.
        assert await store.read_verified(cs[2].digest) is None and cs[2].digest not in store
        assert await store.read(cs[2].digest) is None

    run(go())
