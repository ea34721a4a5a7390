"""Prefetcher over an ImageFS on a memory backend: order, coverage, rate, priority, failures."""

from __future__ import annotations

import asyncio
import contextvars
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from nydusfs.builder import BuildOptions, build
from nydusfs.config import PrefetchConfig
from nydusfs.format.reader import Bootstrap
from nydusfs.format.records import ChunkRecord
from nydusfs.fs.model import ImageFS
from nydusfs.fs.prefetch import Prefetcher, TokenBucket
from nydusfs.storage.base import Backend, RangeRequest
from nydusfs.storage.memory import MemoryBackend

KiB = 1 << 10
CHUNK = 64 * KiB
BATCH = 4 * CHUNK
BOOT_FILE = "z/boot"  # the prefetch list; last in directory order, first in the blob

# Who is asking the backend: set in the task that starts the work, inherited by its subtasks.
ROLE: contextvars.ContextVar[str] = contextvars.ContextVar("role", default="fg")


@dataclass(frozen=True)
class Seen:
    role: str
    foreground: int  # on-demand reads in progress when the request arrived
    request: RangeRequest


class Recording(Backend):
    """Records each request with who sent it; ``hold`` parks requests until it is set."""

    name = "recording"

    def __init__(self, inner: Backend, fs: Callable[[], ImageFS]) -> None:
        self.inner = inner
        self.fs = fs
        self.seen: list[Seen] = []
        self.hold: asyncio.Event | None = None
        self.held = 0

    async def read(self, blob: str, offset: int, size: int) -> bytes:
        return (await self.read_many([RangeRequest(blob, offset, size)]))[0]

    async def read_many(self, requests: Sequence[RangeRequest]) -> list[bytes]:
        fg = self.fs()._foreground
        self.seen.extend(Seen(ROLE.get(), fg, r) for r in requests)
        if self.hold is not None:
            self.held += 1
            await self.hold.wait()
        return await self.inner.read_many(requests)

    @property
    def requests(self) -> list[RangeRequest]:
        return [s.request for s in self.seen]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prefetch")
    src = root / "src"
    rng = random.Random(3)
    (src / "a").mkdir(parents=True)
    for i in range(6):  # incompressible and compressible files: compressed sizes differ
        data = rng.randbytes(150 * KiB) if i % 2 else f"line {i}\n".encode() * 30000
        (src / "a" / f"f{i}").write_bytes(data)
    (src / "z").mkdir()
    (src / BOOT_FILE).write_bytes(rng.randbytes(200 * KiB))
    build([str(src)], root / "image",
          BuildOptions(chunk_size=CHUNK, prefetch=[BOOT_FILE.encode()], workers=1))
    return root / "image"


@dataclass
class Rig:
    fs: ImageFS
    backend: Recording
    mem: MemoryBackend
    blob: str

    def chunks_of(self, path: str) -> list[ChunkRecord]:
        boot = self.fs.boot
        return [ref.chunk for ref in boot.file_chunks(boot.resolve(path))]

    def ino(self, path: str) -> int:
        return self.fs.boot.resolve(path).ino

    def fetch_counts(self) -> dict[bytes, int]:
        """How many backend requests covered each chunk."""
        counts = {r.digest: 0 for r in self.fs.chunks_in_blob_order()}
        for req in self.backend.requests:
            for r in self.fs.chunks_in_blob_order():
                if req.offset <= r.compressed_offset and \
                        r.compressed_offset + r.compressed_size <= req.offset + req.size:
                    counts[r.digest] += 1
        return counts

    def first_request_index(self, rec: ChunkRecord) -> int:
        for i, req in enumerate(self.backend.requests):
            if req.offset <= rec.compressed_offset < req.offset + req.size:
                return i
        raise AssertionError(f"chunk {rec.hex} never fetched")


def _rig(image: Path, store: DictStore | None = None) -> Rig:
    blobs = {p.name: p.read_bytes() for p in (image / "blobs").iterdir()}
    (blob,) = blobs
    mem = MemoryBackend(blobs)
    holder: list[ImageFS] = []
    rec = Recording(mem, lambda: holder[0])
    fs = ImageFS(Bootstrap.open(image / "bootstrap"), rec, merge_window=0, store=store)
    holder.append(fs)
    return Rig(fs, rec, mem, blob)


class DictStore:
    """A ChunkStore in a dict (the disk cache's role, without the disk)."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    async def get(self, digest: bytes, size: int) -> bytes | None:
        return self.data.get(digest)

    async def put(self, digest: bytes, data: bytes) -> None:
        self.data[digest] = data


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(seconds, 0.0)
        await asyncio.sleep(0)


async def _until(cond: Callable[[], bool], what: str, spins: int = 1000) -> None:
    """Let the loop run until ``cond`` holds (bounded; decode runs in a thread, so yield time)."""
    for _ in range(spins):
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


def _run_prefetch(p: Prefetcher) -> None:
    async def main() -> None:
        ROLE.set("bg")
        await p.run()

    asyncio.run(main())


# ---- order and coverage -------------------------------------------------------------------

def test_prefetch_list_is_fetched_before_any_other_chunk(image: Path) -> None:
    rig = _rig(image)
    listed = rig.fs.prefetch_list_chunks()
    assert [r.digest for r in listed] == [r.digest for r in rig.chunks_of(BOOT_FILE)]
    p = Prefetcher(rig.fs, all=True, bandwidth=0, concurrency=4, batch_bytes=BATCH)
    _run_prefetch(p)
    last_listed = max(rig.first_request_index(r) for r in listed)
    others = [r for r in rig.fs.chunks_in_blob_order() if r.digest not in
              {x.digest for x in listed}]
    assert others
    assert last_listed < min(rig.first_request_index(r) for r in others)


def test_a_list_out_of_blob_order_still_goes_first(
        image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The builder puts the list first in the blob; the prefetcher must not rely on that."""
    rig = _rig(image)
    late = rig.chunks_of("a/f4")
    monkeypatch.setattr(rig.fs, "prefetch_list_chunks", lambda: late)
    p = Prefetcher(rig.fs, all=True, bandwidth=0, concurrency=3, batch_bytes=BATCH)
    _run_prefetch(p)
    others = [r for r in rig.fs.chunks_in_blob_order() if r.digest not in
              {x.digest for x in late}]
    assert max(rig.first_request_index(r) for r in late) < \
        min(rig.first_request_index(r) for r in others)
    assert p.state == "done"


def test_all_fetches_every_chunk_exactly_once(image: Path) -> None:
    rig = _rig(image)
    everything = rig.fs.chunks_in_blob_order()
    p = Prefetcher(rig.fs, all=True, bandwidth=0, concurrency=4, batch_bytes=BATCH)
    assert p.snapshot()["state"] == "idle"
    _run_prefetch(p)
    assert set(rig.fetch_counts().values()) == {1}
    assert p.state == "done"
    assert p.total_chunks == p.done_chunks == len(everything)
    assert p.total_bytes == p.done_bytes == sum(r.uncompressed_size for r in everything)
    assert p.failed_chunks == 0
    # batches merged neighbours: far fewer requests than chunks
    assert len(rig.backend.requests) < len(everything) / 2
    snap = p.snapshot()
    assert snap["done_chunks"] == snap["total_chunks"] == len(everything)
    assert snap["state"] == "done"


def test_without_all_only_the_list_is_fetched(image: Path) -> None:
    rig = _rig(image)
    listed = {r.digest for r in rig.fs.prefetch_list_chunks()}
    p = Prefetcher.from_config(rig.fs, PrefetchConfig(all=False, concurrency=2),
                               batch_bytes=BATCH)
    _run_prefetch(p)
    fetched = {d for d, n in rig.fetch_counts().items() if n}
    assert fetched == listed
    assert p.state == "done"
    assert p.total_chunks == p.done_chunks == len(listed)


def test_after_a_full_prefetch_the_backend_can_go(image: Path) -> None:
    store = DictStore()
    rig = _rig(image, store)
    _run_prefetch(Prefetcher(rig.fs, all=True, bandwidth=0, concurrency=4, batch_bytes=BATCH))
    rig.mem.fail(rig.blob, times=-1)
    before = len(rig.backend.requests)

    async def read_all() -> None:
        for path in [BOOT_FILE, *(f"a/f{i}" for i in range(6))]:
            size = rig.fs.getattr(rig.ino(path)).size
            assert len(await rig.fs.read(rig.ino(path), 0, size)) == size

    asyncio.run(read_all())
    assert len(rig.backend.requests) == before


# ---- bandwidth --------------------------------------------------------------------------

def test_bandwidth_limit_in_simulated_time(image: Path) -> None:
    rig = _rig(image)
    t = FakeTime()
    bandwidth = 64 * KiB  # bytes/s
    batch = CHUNK  # many batches: the limit, not the first free one, decides the time
    p = Prefetcher(rig.fs, all=True, bandwidth=bandwidth, concurrency=3, batch_bytes=batch,
                   clock=t.clock, sleep=t.sleep)
    sent: list[tuple[float, int]] = []  # (fake time, compressed bytes asked so far)
    inner_read_many = rig.backend.read_many

    async def timed(requests: Sequence[RangeRequest]) -> list[bytes]:
        total = (sent[-1][1] if sent else 0) + sum(r.size for r in requests)
        sent.append((t.now, total))
        return await inner_read_many(requests)

    rig.backend.read_many = timed  # type: ignore[method-assign]
    start = t.now
    _run_prefetch(p)
    elapsed = t.now - start
    compressed = sum(r.compressed_size for r in rig.fs.chunks_in_blob_order())
    assert p.state == "done"
    assert sent[-1][1] == compressed
    # Every batch is paid for before it starts, and the first one is free, so the run takes
    # the time of all bytes but one batch: within one batch of total/bandwidth.
    tolerance = (batch + CHUNK) / bandwidth
    assert abs(elapsed - compressed / bandwidth) <= tolerance
    assert elapsed > 2 * tolerance  # the limit really bit (the image is many batches)
    for when, total in sent:  # never ahead of the rate by more than one batch
        assert total <= (when - start) * bandwidth + batch + CHUNK


def test_zero_bandwidth_never_sleeps(image: Path) -> None:
    rig = _rig(image)
    t = FakeTime()
    p = Prefetcher(rig.fs, all=True, bandwidth=0, concurrency=2, batch_bytes=BATCH,
                   clock=t.clock, sleep=t.sleep)
    _run_prefetch(p)
    assert p.state == "done" and t.sleeps == []


def test_token_bucket_lets_an_oversized_request_through_and_charges_it() -> None:
    t = FakeTime()
    bucket = TokenBucket(100, burst=100, clock=t.clock, sleep=t.sleep)

    async def main() -> None:
        await bucket.acquire(1000)  # bigger than the bucket: passes, balance -1000
        assert t.now == 1000.0
        await bucket.acquire(10)  # pays the debt first: 10 s
        assert t.now == pytest.approx(1010.0)
        t.now += 60  # idle time refills to the burst only: -10 + 6000 → 100
        await bucket.acquire(100)
        await bucket.acquire(1)  # balance 0: not in debt, passes
        assert t.now == pytest.approx(1070.0)
        await bucket.acquire(1)  # 1 byte of debt: 0.01 s
        assert t.now == pytest.approx(1070.01)

    asyncio.run(main())


# ---- priority ---------------------------------------------------------------------------

def test_on_demand_read_blocks_background_batches(image: Path) -> None:
    rig = _rig(image)
    p = Prefetcher(rig.fs, all=True, bandwidth=0, concurrency=4, batch_bytes=BATCH)
    target = "a/f1"
    size = rig.fs.getattr(rig.ino(target)).size
    done: list[str] = []

    async def main() -> None:
        rig.backend.hold = gate = asyncio.Event()
        fg = asyncio.create_task(rig.fs.read(rig.ino(target), 0, size))
        fg.add_done_callback(lambda _t: done.append("read"))
        await _until(lambda: rig.backend.held == 1, "the on-demand request")

        async def background() -> None:
            ROLE.set("bg")
            await p.run()
            done.append("prefetch")

        bg = asyncio.create_task(background())
        for _ in range(20):  # the prefetcher gets every chance to start a batch
            await asyncio.sleep(0.001)
        assert [s.role for s in rig.backend.seen] == ["fg"]
        assert p.done_chunks == 0
        rig.backend.hold = None
        gate.set()
        assert len(await fg) == size
        await bg

    asyncio.run(main())
    assert done == ["read", "prefetch"]
    assert p.state == "done"


def test_on_demand_reads_during_prefetch_go_first(image: Path) -> None:
    rig = _rig(image)
    p = Prefetcher(rig.fs, all=True, bandwidth=0, concurrency=2, batch_bytes=CHUNK)
    done: list[str] = []

    async def main() -> None:
        async def background() -> None:
            ROLE.set("bg")
            await p.run()
            done.append("prefetch")

        bg = asyncio.create_task(background())
        await _until(lambda: len(rig.backend.seen) >= 2, "prefetch to start")

        async def reader(path: str) -> None:
            ino = rig.ino(path)
            size = rig.fs.getattr(ino).size
            for off in range(0, size, 32 * KiB):  # many small reads, one at a time
                assert await rig.fs.read(ino, off, 32 * KiB)
            done.append(path)

        await asyncio.gather(reader("a/f3"), reader("a/f5"))
        await bg

    asyncio.run(main())
    # Which finishes last depends on scheduling (the prefetch may use the gaps between one
    # reader's reads to finish first); what must hold is that it never sent a request while an
    # on-demand read was in progress.
    assert sorted(done) == ["a/f3", "a/f5", "prefetch"]
    assert p.state == "done"
    background = [s for s in rig.backend.seen if s.role == "bg"]
    assert background and all(s.foreground == 0 for s in background)
    assert any(s.role == "fg" for s in rig.backend.seen)


# Regression: chunks(background=True) once trusted a single Event.wait(); a read starting in
# the same loop step as the previous one ended let a woken background batch go ahead.
def test_back_to_back_reads_keep_background_waiting(image: Path) -> None:
    rig = _rig(image)
    p = Prefetcher(rig.fs, all=True, bandwidth=0, concurrency=2, batch_bytes=BATCH)

    async def main() -> None:
        rig.backend.hold = gate = asyncio.Event()

        async def reads() -> None:  # two reads in one task: no loop step between them
            await rig.fs.read(rig.ino("a/f1"), 0, 10)
            await rig.fs.read(rig.ino("a/f3"), 0, 10)

        fg = asyncio.create_task(reads())
        await _until(lambda: rig.backend.held == 1, "the first on-demand request")

        async def background() -> None:
            ROLE.set("bg")
            await p.run()

        bg = asyncio.create_task(background())
        await asyncio.sleep(0.01)  # the prefetcher is now waiting for the reads to end
        rig.backend.hold = None
        gate.set()
        await asyncio.gather(fg, bg)

    asyncio.run(main())
    background = [s for s in rig.backend.seen if s.role == "bg"]
    assert background and all(s.foreground == 0 for s in background)


# ---- failures and cancellation ------------------------------------------------------------

def test_a_failing_blob_is_counted_not_raised(image: Path) -> None:
    rig = _rig(image)
    rig.mem.fail(rig.blob, times=-1)
    p = Prefetcher(rig.fs, all=True, bandwidth=0, concurrency=3, batch_bytes=BATCH)
    _run_prefetch(p)  # no exception
    n = len(rig.fs.chunks_in_blob_order())
    assert p.state == "failed"
    assert p.failed_chunks == p.total_chunks == n
    assert p.done_chunks == 0
    # one request per batch, no retry loop
    assert len(rig.backend.requests) == len(p._batches(rig.fs.prefetch_list_chunks())) + \
        len(p._batches([r for r in rig.fs.chunks_in_blob_order()
                        if r.digest not in {x.digest for x in rig.fs.prefetch_list_chunks()}]))


def test_one_failed_batch_is_skipped_and_the_rest_fetched(image: Path) -> None:
    rig = _rig(image)
    rig.mem.fail(rig.blob, times=1)
    p = Prefetcher(rig.fs, all=True, bandwidth=0, concurrency=1, batch_bytes=BATCH)
    _run_prefetch(p)
    first = p._batches(rig.fs.prefetch_list_chunks())[0]
    assert p.failed_chunks == len(first)
    assert p.done_chunks + p.failed_chunks == p.total_chunks
    assert p.done_chunks > 0
    assert p.state == "failed"  # finished, but not everything is local


def _cancel_mid_way(image: Path, stop: Callable[[Prefetcher, asyncio.Task[None]],
                                                Awaitable[None]]) -> Prefetcher:
    rig = _rig(image)
    p = Prefetcher(rig.fs, all=True, bandwidth=0, concurrency=2, batch_bytes=BATCH)

    async def main() -> None:
        rig.backend.hold = asyncio.Event()  # never set: prefetch parks in the backend
        task = p.start()
        await _until(lambda: rig.backend.held >= 1, "a batch in flight")
        assert p.state == "list"
        await stop(p, task)
        assert task.done()

    asyncio.run(main())
    return p


def test_cancelling_the_task_ends_cleanly(image: Path) -> None:
    async def cancel(_p: Prefetcher, task: asyncio.Task[None]) -> None:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    p = _cancel_mid_way(image, cancel)
    assert p.state == "cancelled"
    assert p.done_chunks == 0 and p.failed_chunks == 0


def test_stop_cancels_without_raising(image: Path) -> None:
    async def stop(p: Prefetcher, _task: asyncio.Task[None]) -> None:
        await p.stop()
        await p.stop()  # idempotent

    p = _cancel_mid_way(image, stop)
    assert p.snapshot()["state"] == "cancelled"


def test_bad_arguments_are_rejected(image: Path) -> None:
    rig = _rig(image)
    for bandwidth, concurrency, batch in ((-1, 1, 1), (0, 0, 1), (0, 1, 0)):
        with pytest.raises(ValueError):
            Prefetcher(rig.fs, all=True, bandwidth=bandwidth, concurrency=concurrency,
                       batch_bytes=batch)


# ---- rotation over a per-chunk backend ------------------------------------------------------

class _FixedRng(random.Random):
    """``randrange`` answers ``pick`` (the rotation's start batch), and records the bound."""

    def __init__(self, pick: int) -> None:
        super().__init__(0)
        self.pick = pick
        self.bounds: list[int] = []

    def randrange(self, *args: int, **kwargs: object) -> int:  # type: ignore[override]
        self.bounds.append(args[0])
        return self.pick


def test_a_per_chunk_backend_starts_the_all_phase_at_a_random_batch(image: Path) -> None:
    """Nodes prefetching one image through the P2P agent each start somewhere else; the list
    still goes first and in order, every chunk is fetched once, batches stay intact."""
    rig = _rig(image)
    rig.backend.per_chunk = True  # as the dragonfly backend (through the wrapper stack) says
    rng = _FixedRng(2)
    p = Prefetcher(rig.fs, all=True, bandwidth=0, concurrency=1, batch_bytes=CHUNK, rng=rng)
    assert p.rotate
    _run_prefetch(p)
    listed = rig.fs.prefetch_list_chunks()
    listed_ids = {r.digest for r in listed}
    others = [r for r in rig.fs.chunks_in_blob_order() if r.digest not in listed_ids]
    batches = p._batches(others)
    assert len(batches) > 2 and rng.bounds == [len(batches)]  # only the all phase rotates
    assert set(rig.fetch_counts().values()) == {1}
    # The list first, in list order; then batches 2, 3, ..., 0, 1.
    order = sorted(rig.fs.chunks_in_blob_order(), key=rig.first_request_index)
    assert [r.digest for r in order[:len(listed)]] == [r.digest for r in listed]
    expect = [r.digest for b in batches[2:] + batches[:2] for r in b]
    assert [r.digest for r in order[len(listed):]] == expect
    assert p.state == "done"


def test_a_merging_backend_keeps_blob_order(image: Path) -> None:
    rig = _rig(image)
    p = Prefetcher(rig.fs, all=True, bandwidth=0, concurrency=1, batch_bytes=CHUNK,
                   rng=_FixedRng(2))
    assert not p.rotate
    _run_prefetch(p)
    listed_ids = {r.digest for r in rig.fs.prefetch_list_chunks()}
    others = [r for r in rig.fs.chunks_in_blob_order() if r.digest not in listed_ids]
    firsts = [rig.first_request_index(r) for r in others]
    assert firsts == sorted(firsts)
