"""ImageFS without FUSE: metadata, the verified read path, single flight, errors as errno."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from nydusfs.builder import BuildOptions, build, read_prefetch_file
from nydusfs.format.reader import Bootstrap
from nydusfs.fs.model import FsError, ImageFS
from nydusfs.storage.base import Backend, RangeRequest
from nydusfs.storage.cache import DiskChunkStore
from nydusfs.storage.memory import MemoryBackend

MiB = 1 << 20


class Recording(Backend):
    """Records every range asked of the inner backend (the laziness tests count them)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.requests: list[RangeRequest] = []

    async def read(self, blob: str, offset: int, size: int) -> bytes:
        self.requests.append(RangeRequest(blob, offset, size))
        return await self.inner.read(blob, offset, size)

    async def read_many(self, requests: Sequence[RangeRequest]) -> list[bytes]:
        self.requests.extend(requests)
        return await self.inner.read_many(requests)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("model")
    src = root / "src"
    rng = random.Random(5)
    (src / "big").mkdir(parents=True)
    for i in range(8):  # 8 files of 3.5 MiB: 32 chunks, incompressible
        (src / "big" / f"f{i}").write_bytes(rng.randbytes(3 * MiB + MiB // 2))
    (src / "small").mkdir()
    for i in range(50):
        (src / "small" / f"s{i:02}").write_bytes(f"small file {i}\n".encode() * (i + 1))
    os.symlink("small/s01", src / "link")
    os.setxattr(src / "small" / "s00", "user.k", b"v")
    build([str(src)], root / "image", BuildOptions())
    return src, root / "image"


def _fs(image: Path, merge_window: int = 128 << 10) -> tuple[ImageFS, Recording, MemoryBackend]:
    blobs = {p.name: p.read_bytes() for p in (image / "blobs").iterdir()}
    mem = MemoryBackend(blobs)
    rec = Recording(mem)
    fs = ImageFS(Bootstrap.open(image / "bootstrap"), rec, merge_window=merge_window)
    return fs, rec, mem


def _ino(fs: ImageFS, path: str) -> int:
    ino = 1
    for part in path.split("/"):
        ino = fs.lookup(ino, part.encode()).ino
    return ino


def test_metadata(image: tuple[Path, Path]) -> None:
    src, img = image
    fs, _, _ = _fs(img)
    names = [n for n, _a, _o in fs.readdir(1)]
    assert names == sorted(os.fsencode(n) for n in os.listdir(src))
    # readdir offsets are stable: resuming at an offset continues the same listing
    entries = list(fs.readdir(_ino(fs, "small")))
    resumed = list(fs.readdir(_ino(fs, "small"), entries[10][2]))
    assert [e[0] for e in resumed] == [e[0] for e in entries[11:]]
    a = fs.getattr(_ino(fs, "small/s03"))
    st = os.lstat(src / "small" / "s03")
    assert (a.mode, a.size, a.uid, a.mtime_ns) == (st.st_mode, st.st_size, st.st_uid,
                                                    st.st_mtime_ns)
    assert fs.readlink(_ino(fs, "link")) == b"small/s01"
    assert fs.getxattr(_ino(fs, "small/s00"), b"user.k") == b"v"
    assert fs.listxattr(_ino(fs, "small/s00")) == [b"user.k"]
    cases: list[tuple[Callable[[], object], int]] = [
                      (lambda: fs.lookup(1, b"nope"), errno.ENOENT),
                       (lambda: fs.getxattr(1, b"user.none"), errno.ENODATA),
                       (lambda: fs.readlink(1), errno.EINVAL),
                       (lambda: fs.lookup(_ino(fs, "link"), b"x"), errno.ENOTDIR),
                       (lambda: fs.check_open(_ino(fs, "big/f0"), True), errno.EROFS),
                       (lambda: fs.getattr(10**6), errno.ENOENT)]
    for call, code in cases:
        with pytest.raises(FsError) as info:
            call()
        assert info.value.errno == code


def test_reads_return_the_source_bytes(image: tuple[Path, Path]) -> None:
    src, img = image
    fs, _, _ = _fs(img)
    rng = random.Random(9)

    async def run() -> None:
        for i in range(8):
            want = (src / "big" / f"f{i}").read_bytes()
            ino = _ino(fs, f"big/f{i}")
            assert await fs.read(ino, 0, len(want) + 100) == want
            for _ in range(20):
                off = rng.randrange(len(want) + 10)
                size = rng.randrange(1, 2 * MiB)
                assert await fs.read(ino, off, size) == want[off : off + size]

    asyncio.run(run())


def test_one_file_fetches_only_its_chunks(image: tuple[Path, Path]) -> None:
    _src, img = image
    fs, rec, _ = _fs(img, merge_window=0)
    ino = _ino(fs, "big/f3")
    asyncio.run(fs.read(ino, 0, 4 * MiB))
    with Bootstrap.open(img / "bootstrap") as boot:
        mine = {(r.chunk.compressed_offset, r.chunk.compressed_size)
                for r in boot.file_chunks(boot.resolve("big/f3"))}
    fetched = sum(r.size for r in rec.requests)
    assert fetched == sum(size for _off, size in mine)
    for r in rec.requests:  # every byte fetched belongs to this file's chunks
        assert any((off <= r.offset and r.offset + r.size <= off + size) or
                   r.offset <= off < r.offset + r.size for off, size in mine)


def test_concurrent_readers_share_one_fetch_per_chunk(image: tuple[Path, Path]) -> None:
    src, img = image
    fs, rec, _ = _fs(img)
    want = (src / "big" / "f5").read_bytes()
    ino = _ino(fs, "big/f5")

    async def run() -> list[bytes]:
        return list(await asyncio.gather(*(fs.read(ino, (i % 4) * MiB // 2, 2 * MiB)
                                           for i in range(32))))

    results = asyncio.run(run())
    for i, data in enumerate(results):
        off = (i % 4) * MiB // 2
        assert data == want[off : off + 2 * MiB]
    assert fs.stats.chunks_fetched == 4  # 3.5 MiB: 4 chunks, each fetched once
    assert sum(r.size for r in rec.requests) <= (img / "blobs").stat().st_size + 4 * MiB


def test_corrupt_chunk_is_eio_and_never_wrong_bytes(image: tuple[Path, Path]) -> None:
    src, img = image
    fs, _, mem = _fs(img)
    with Bootstrap.open(img / "bootstrap") as boot:
        ref = boot.file_chunks(boot.resolve("big/f1"))[2]
        blob = boot.blob(ref.chunk.blob_index).hex
    data = bytearray((img / "blobs" / blob).read_bytes())
    data[ref.chunk.compressed_offset + 7] ^= 0x01
    mem.put(blob, bytes(data))
    ino = _ino(fs, "big/f1")
    want = (src / "big" / "f1").read_bytes()

    async def run() -> None:
        assert await fs.read(ino, 0, 2 * MiB) == want[: 2 * MiB]  # chunks 0-1 are fine
        with pytest.raises(FsError) as info:
            await fs.read(ino, 2 * MiB + 5, 100)
        assert info.value.errno == errno.EIO
        other = _ino(fs, "big/f2")
        assert await fs.read(other, 0, 10**8) == (src / "big" / "f2").read_bytes()

    asyncio.run(run())
    assert fs.stats.verification_failures == 2  # the first fetch and one refetch


def test_backend_failure_is_eio(image: tuple[Path, Path]) -> None:
    _src, img = image
    fs, _, _ = _fs(img)
    fs.backend = MemoryBackend({})  # every blob missing

    async def run() -> None:
        with pytest.raises(FsError) as info:
            await fs.read(_ino(fs, "big/f0"), 0, 10)
        assert info.value.errno == errno.EIO

    asyncio.run(run())


def test_access_trace_records_first_reads_in_order_and_feeds_prefetch(
    image: tuple[Path, Path], tmp_path: Path
) -> None:
    src, img = image
    blobs = {p.name: p.read_bytes() for p in (img / "blobs").iterdir()}
    trace = io.BytesIO()
    fs = ImageFS(Bootstrap.open(img / "bootstrap"), MemoryBackend(blobs), access_trace=trace)
    order = ["small/s07", "big/f2", "small/s07", "small/s00"]

    async def run() -> None:
        for path in order:
            await fs.read(_ino(fs, path), 0, 10)

    asyncio.run(run())
    fs.flush_trace()
    assert trace.getvalue() == b"/small/s07\n/big/f2\n/small/s00\n"
    # The trace is a prefetch list: rebuilding with it puts those files first.
    (tmp_path / "trace").write_bytes(trace.getvalue())
    build([str(src)], tmp_path / "img2",
          BuildOptions(prefetch=read_prefetch_file(tmp_path / "trace")))
    with Bootstrap.open(tmp_path / "img2" / "bootstrap") as boot:
        assert boot.prefetch() == [boot.resolve(p).ino for p in ("small/s07", "big/f2",
                                                                   "small/s00")]


def test_sequential_reads_trigger_readahead(image: tuple[Path, Path]) -> None:
    src, img = image
    blobs = {p.name: p.read_bytes() for p in (img / "blobs").iterdir()}
    fs = ImageFS(Bootstrap.open(img / "bootstrap"), MemoryBackend(blobs), readahead_chunks=2)
    want = (src / "big" / "f6").read_bytes()  # 4 chunks

    async def run() -> None:
        ino = _ino(fs, "big/f6")
        assert await fs.read(ino, 0, MiB) == want[:MiB]
        assert fs.stats.chunks_fetched == 1  # a first read is not yet sequential
        assert await fs.read(ino, MiB, MiB) == want[MiB : 2 * MiB]
        await asyncio.gather(*list(fs._tasks))
        assert fs.stats.chunks_fetched == 4  # chunks 2 and 3 read ahead
        fetched = fs.stats.chunks_fetched
        assert await fs.read(ino, 2 * MiB, 2 * MiB) == want[2 * MiB :]
        assert fs.stats.chunks_fetched == fetched  # served from memory

    asyncio.run(run())


def test_tampered_disk_cache_entry_is_dropped_and_refetched(
    image: tuple[Path, Path], tmp_path: Path
) -> None:
    src, img = image
    blobs = {p.name: p.read_bytes() for p in (img / "blobs").iterdir()}
    store = DiskChunkStore(tmp_path / "cache", 1 << 30)
    want = (src / "big" / "f4").read_bytes()

    def fresh() -> ImageFS:  # a new mount: empty memory cache, same disk cache
        return ImageFS(Bootstrap.open(img / "bootstrap"), MemoryBackend(blobs), store=store)

    async def run() -> None:
        fs = fresh()
        assert await fs.read(_ino(fs, "big/f4"), 0, 10**8) == want
        assert fs.stats.chunks_fetched == 4 and fs.stats.store_hits == 0
        with Bootstrap.open(img / "bootstrap") as boot:
            victim = boot.file_chunks(boot.resolve("big/f4"))[1].chunk.digest
        path = store.path_of(victim)
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))
        fs2 = fresh()
        assert await fs2.read(_ino(fs2, "big/f4"), 0, 10**8) == want  # never the bad bytes
        assert fs2.stats.store_hits == 3 and fs2.stats.chunks_fetched == 1
        assert store.stats()["corrupt"] == 1
        fs3 = fresh()  # the refetched chunk went back into the cache
        assert await fs3.read(_ino(fs3, "big/f4"), 0, 10**8) == want
        assert fs3.stats.store_hits == 4 and fs3.stats.chunks_fetched == 0

    asyncio.run(run())


def test_cancelled_fetch_does_not_strand_readers_sharing_it(image: tuple[Path, Path]) -> None:
    """A reader waiting on another reader's fetch gets EIO if that fetch is cancelled."""
    src, img = image
    blobs = {p.name: p.read_bytes() for p in (img / "blobs").iterdir()}
    gate = asyncio.Event()

    class Stalling(MemoryBackend):
        async def read_many(self, requests: Sequence[RangeRequest]) -> list[bytes]:
            await gate.wait()
            return await super().read_many(requests)

    fs = ImageFS(Bootstrap.open(img / "bootstrap"), Stalling(blobs))

    async def run() -> None:
        ino = _ino(fs, "big/f0")
        owner = asyncio.ensure_future(fs.read(ino, 0, 100))
        await asyncio.sleep(0)  # the owner starts the fetch
        waiter = asyncio.ensure_future(fs.read(ino, 50, 100))
        await asyncio.sleep(0)
        owner.cancel()
        with pytest.raises(FsError) as info:
            await asyncio.wait_for(waiter, timeout=30)  # a bound, not a timing assertion
        assert info.value.errno == errno.EIO
        gate.set()
        assert await fs.read(ino, 0, 10) == (src / "big" / "f0").read_bytes()[:10]

    asyncio.run(run())
