"""``DiskChunkStore``: verification on read, atomic shared writes, LRU quota, remount."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from nydusfs.format.chunk import chunk_digest
from nydusfs.format.layout import MAX_CHUNK_SIZE
from nydusfs.fs.model import ChunkStore
from nydusfs.storage import cache
from nydusfs.storage.cache import DiskChunkStore

from .helpers import run


class FakeClock:
    """Time that moves only when told to: one tick per call, so every use is ordered."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def chunk(n: int, size: int = 1000) -> tuple[bytes, bytes]:
    """A distinct chunk ``n`` of ``size`` bytes and its digest."""
    data = bytes([n % 256]) * (size - 4) + n.to_bytes(4, "big")
    return chunk_digest(data), data


def store(dir: Path, quota: int = 1 << 20, clock: FakeClock | None = None) -> DiskChunkStore:
    return DiskChunkStore(dir, quota, clock=clock or FakeClock())


def chunk_files(dir: Path) -> list[Path]:
    return sorted(p for p in (dir / "chunks").rglob("*") if p.is_file())


def tmp_files(dir: Path) -> list[Path]:
    return list((dir / "tmp").iterdir()) if (dir / "tmp").exists() else []


def test_put_get_roundtrip_and_layout(tmp_path: Path) -> None:
    s: ChunkStore = store(tmp_path)  # mypy checks the protocol
    assert isinstance(s, DiskChunkStore)
    digest, data = chunk(1)
    run(s.put(digest, data))
    assert run(s.get(digest, len(data))) == data
    hex_ = digest.hex()
    assert chunk_files(tmp_path) == [tmp_path / "chunks" / hex_[:2] / hex_]
    assert s.path_of(digest).read_bytes() == data
    assert tmp_files(tmp_path) == []
    st = s.stats()
    assert (st["hits"], st["misses"], st["bytes_stored"], st["chunks"]) == (1, 0, len(data), 1)


def test_empty_chunk_roundtrip(tmp_path: Path) -> None:
    s = store(tmp_path)
    run(s.put(chunk_digest(b""), b""))
    assert run(s.get(chunk_digest(b""), 0)) == b""


def test_miss(tmp_path: Path) -> None:
    s = store(tmp_path)
    digest, data = chunk(1)
    assert run(s.get(digest, len(data))) is None
    assert s.stats()["misses"] == 1
    assert s.stats()["errors"] == 0


def test_tampered_file_is_deleted_then_refilled(tmp_path: Path) -> None:
    s = store(tmp_path)
    digest, data = chunk(1)
    run(s.put(digest, data))
    path = s.path_of(digest)
    path.write_bytes(b"X" + data[1:])  # same length, wrong bytes
    assert run(s.get(digest, len(data))) is None
    assert not path.exists()
    assert s.stats()["corrupt"] == 1
    run(s.put(digest, data))
    assert run(s.get(digest, len(data))) == data


def test_truncated_file_is_deleted(tmp_path: Path) -> None:
    s = store(tmp_path)
    digest, data = chunk(1)
    run(s.put(digest, data))
    path = s.path_of(digest)
    path.write_bytes(data[:-10])
    assert run(s.get(digest, len(data))) is None
    assert not path.exists()
    assert s.stats()["corrupt"] == 1
    assert s.stats()["chunks"] == 0


def test_size_argument_mismatch_is_a_miss_not_corruption(tmp_path: Path) -> None:
    s = store(tmp_path)
    digest, data = chunk(1)
    run(s.put(digest, data))
    assert run(s.get(digest, len(data) + 1)) is None
    assert run(s.get(digest, len(data) - 1)) is None
    assert s.stats()["corrupt"] == 0
    assert run(s.get(digest, len(data))) == data  # the genuine file was kept


def test_eviction_is_lru_and_get_refreshes(tmp_path: Path) -> None:
    clock = FakeClock()
    s = store(tmp_path, quota=3000, clock=clock)
    (d1, b1), (d2, b2), (d3, b3), (d4, b4) = (chunk(i) for i in range(1, 5))
    for d, b in ((d1, b1), (d2, b2), (d3, b3)):
        run(s.put(d, b))
    assert run(s.get(d1, len(b1))) == b1  # 1 is now the most recent; 2 the least
    run(s.put(d4, b4))
    assert run(s.get(d2, len(b2))) is None
    assert [run(s.get(d, len(b))) for d, b in ((d1, b1), (d3, b3), (d4, b4))] == [b1, b3, b4]
    assert s.stats()["evictions"] == 1
    assert s.stats()["bytes"] == 3000
    assert len(chunk_files(tmp_path)) == 3


def test_recency_survives_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    s = store(tmp_path, quota=3000, clock=clock)
    chunks = [chunk(i) for i in range(1, 5)]
    for d, b in chunks[:3]:
        run(s.put(d, b))
    run(s.get(chunks[0][0], 1000))  # refresh 1: recorded in its mtime
    s2 = store(tmp_path, quota=3000, clock=clock)
    run(s2.put(*chunks[3]))
    assert not s2.path_of(chunks[1][0]).exists()  # 2 was least recently used
    assert all(s2.path_of(d).exists() for d, _ in (chunks[0], chunks[2], chunks[3]))


def test_oversize_chunk_not_stored(tmp_path: Path) -> None:
    s = store(tmp_path, quota=500)
    digest, data = chunk(1, size=501)
    run(s.put(digest, data))
    assert run(s.get(digest, len(data))) is None
    assert chunk_files(tmp_path) == []
    assert s.stats()["bytes_stored"] == 0


def test_survives_new_instance(tmp_path: Path) -> None:
    chunks = [chunk(i) for i in range(5)]
    s = store(tmp_path)
    for d, b in chunks:
        run(s.put(d, b))
    s2 = store(tmp_path)
    assert [run(s2.get(d, len(b))) for d, b in chunks] == [b for _, b in chunks]
    assert s2.stats()["chunks"] == 5
    assert s2.stats()["hits"] == 5


def test_two_instances_share_one_dir(tmp_path: Path) -> None:
    a, b = store(tmp_path), store(tmp_path)
    d1, b1 = chunk(1)
    d2, b2 = chunk(2)

    async def both() -> list[bytes | None]:
        await a.put(d1, b1)
        await b.put(d2, b2)
        return [await b.get(d1, len(b1)), await a.get(d2, len(b2))]

    assert run(both()) == [b1, b2]
    # A tampered shared file is caught by whichever mount reads it next.
    b.path_of(d1).write_bytes(b2)
    assert run(a.get(d1, len(b1))) is None
    assert run(b.get(d1, len(b1))) is None
    assert a.stats()["corrupt"] == 1


def test_quota_counts_chunks_of_other_instances_after_rescan(tmp_path: Path) -> None:
    clock = FakeClock()
    a = DiskChunkStore(tmp_path, 3000, clock=clock, rescan_interval=100)
    b = DiskChunkStore(tmp_path, 3000, clock=clock, rescan_interval=100)
    run(b.put(*chunk(1)))  # b has scanned: its view is {1}
    run(a.put(*chunk(2)))
    run(a.put(*chunk(3)))
    run(b.put(*chunk(4)))  # b's view {1, 4}: within quota, though the dir holds 4000 bytes
    assert len(chunk_files(tmp_path)) == 4
    clock.now += 100
    run(b.put(*chunk(5)))  # rescan sees a's chunks: evicts the two oldest, 1 and 2
    assert [run(b.get(*_digest_and_size(chunk(i)))) is not None for i in range(1, 6)] == [
        False, False, True, True, True]
    assert b.stats()["evictions"] == 2


def test_concurrent_puts_of_one_digest(tmp_path: Path) -> None:
    s = store(tmp_path)
    digest, data = chunk(7, size=200_000)

    async def many() -> None:
        await asyncio.gather(*(s.put(digest, data) for _ in range(50)))

    run(many())
    assert chunk_files(tmp_path) == [s.path_of(digest)]
    assert s.path_of(digest).read_bytes() == data
    assert tmp_files(tmp_path) == []
    assert s.stats()["chunks"] == 1
    assert run(s.get(digest, len(data))) == data


def test_concurrent_puts_from_two_instances(tmp_path: Path) -> None:
    stores = [store(tmp_path) for _ in range(5)]
    digest, data = chunk(8, size=200_000)

    async def many() -> None:
        await asyncio.gather(*(st.put(digest, data) for st in stores for _ in range(10)))

    run(many())
    assert chunk_files(tmp_path) == [stores[0].path_of(digest)]
    assert tmp_files(tmp_path) == []
    assert run(stores[4].get(digest, len(data))) == data


def test_dir_is_a_regular_file(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-dir"
    bad.write_bytes(b"")
    s = store(bad)
    digest, data = chunk(1)
    run(s.put(digest, data))  # does not raise
    assert run(s.get(digest, len(data))) is None
    assert s.stats()["errors"] >= 2
    assert bad.read_bytes() == b""


def test_stale_temp_files_cleared_on_scan(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    stale = tmp_path / "tmp" / "dead-writer"
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    fresh = tmp_path / "tmp" / "live-writer"
    fresh.write_bytes(b"partial")
    s = store(tmp_path)
    run(s.put(*chunk(1)))
    assert not stale.exists()
    assert fresh.exists()


def test_oversized_file_on_disk_is_corrupt(tmp_path: Path) -> None:
    s = store(tmp_path)
    digest, data = chunk(1)
    path = s.path_of(digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(MAX_CHUNK_SIZE + 1))  # never read whole, never returned
    assert run(s.get(digest, len(data))) is None
    assert not path.exists()
    assert s.stats()["corrupt"] == 1


def test_malformed_digest_is_a_caller_bug(tmp_path: Path) -> None:
    s = store(tmp_path)
    with pytest.raises(ValueError, match="32 bytes"):
        run(s.get(b"short", 1))
    with pytest.raises(ValueError, match="32 bytes"):
        run(s.put(b"short", b"x"))


def test_disk_io_runs_off_the_event_loop_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    real_read, real_write = cache._read_bounded, DiskChunkStore._write

    def read(path: Path) -> bytes | None:
        threads.append(threading.get_ident())
        return real_read(path)

    def write(self: DiskChunkStore, path: Path, data: bytes, now: float) -> None:
        threads.append(threading.get_ident())
        real_write(self, path, data, now)

    monkeypatch.setattr(cache, "_read_bounded", read)
    monkeypatch.setattr(DiskChunkStore, "_write", write)
    s = store(tmp_path)
    digest, data = chunk(1)
    run(s.put(digest, data))
    assert run(s.get(digest, len(data))) == data
    assert len(threads) == 2
    assert threading.get_ident() not in threads


def test_chunk_files_readable_by_other_users(tmp_path: Path) -> None:
    s = store(tmp_path)
    digest, data = chunk(1)
    run(s.put(digest, data))
    assert s.path_of(digest).stat().st_mode & 0o777 == 0o644


def _digest_and_size(c: tuple[bytes, bytes]) -> tuple[bytes, int]:
    return c[0], len(c[1])
