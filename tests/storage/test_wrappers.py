"""Timeout, retry and counting wrappers, with injected sleep so nothing waits for real."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from nydusfs.errors import IntegrityError, NotFoundError, UnavailableError
from nydusfs.storage import (
    Backend,
    CountingBackend,
    RangeRequest,
    RetryingBackend,
    TimeoutBackend,
)
from nydusfs.storage.memory import MemoryBackend

from .helpers import MISSING, blob_name, run

DATA = bytes(range(256)) * 64
NAME = blob_name(DATA)


class FakeSleep:
    """Records requested delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class Flaky(Backend):
    """Raises the given exceptions in turn, then serves ``DATA``; counts calls of each kind."""

    def __init__(self, errors: Sequence[Exception]) -> None:
        self.errors = list(errors)
        self.reads = 0
        self.batches = 0

    async def read(self, blob: str, offset: int, size: int) -> bytes:
        self.reads += 1
        if self.errors:
            raise self.errors.pop(0)
        return DATA[offset:offset + size]

    async def read_many(self, requests: Sequence[RangeRequest]) -> list[bytes]:
        self.batches += 1
        if self.errors:
            raise self.errors.pop(0)
        return [DATA[r.offset:r.offset + r.size] for r in requests]


def _retrying(inner: Backend, sleep: FakeSleep, attempts: int = 4,
              jitter: float = 1.0) -> RetryingBackend:
    return RetryingBackend(inner, attempts=attempts, base_delay=0.05, max_delay=0.3,
                           sleep=sleep, rng=lambda: jitter)


def test_retry_recovers_with_growing_bounded_delays() -> None:
    sleep = FakeSleep()
    inner = Flaky([UnavailableError("down")] * 6)
    be = _retrying(inner, sleep, attempts=7)
    assert run(be.read(NAME, 0, 4)) == DATA[:4]
    assert inner.reads == 7
    assert be.retries == 6
    assert sleep.delays == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.3, 0.3])  # capped


def test_retry_delay_has_full_jitter() -> None:
    sleep = FakeSleep()
    be = _retrying(Flaky([UnavailableError("down")] * 3), sleep, jitter=0.5)
    run(be.read(NAME, 0, 4))
    assert sleep.delays == pytest.approx([0.025, 0.05, 0.1])
    assert all(0 <= RetryingBackend(MemoryBackend()).delay(n) <= 2.0 for n in range(40))


def test_retry_gives_up_after_attempts() -> None:
    sleep = FakeSleep()
    inner = Flaky([UnavailableError("down")] * 10)
    with pytest.raises(UnavailableError, match="gave up after 3 attempts") as info:
        run(_retrying(inner, sleep, attempts=3).read(NAME, 0, 4))
    assert inner.reads == 3
    assert len(sleep.delays) == 2  # no pointless sleep after the last attempt
    assert isinstance(info.value.__cause__, UnavailableError)


@pytest.mark.parametrize("error", [NotFoundError("gone"), IntegrityError("bad bytes"),
                                   ValueError("bug")])
def test_final_errors_are_not_retried(error: Exception) -> None:
    sleep = FakeSleep()
    inner = Flaky([error])
    with pytest.raises(type(error)):
        run(_retrying(inner, sleep).read(NAME, 0, 4))
    assert inner.reads == 1 and sleep.delays == []


def test_retry_covers_read_many_as_a_batch() -> None:
    sleep = FakeSleep()
    inner = Flaky([UnavailableError("down")])
    reqs = [RangeRequest(NAME, 0, 4), RangeRequest(NAME, 4, 4)]
    assert run(_retrying(inner, sleep).read_many(reqs)) == [DATA[:4], DATA[4:8]]
    assert inner.batches == 2 and inner.reads == 0  # the batch was forwarded, not split


def test_retry_over_memory_fault_injection() -> None:
    sleep = FakeSleep()
    mem = MemoryBackend({NAME: DATA}, unavailable={NAME: 2})
    assert run(_retrying(mem, sleep).read(NAME, 10, 5)) == DATA[10:15]
    mem.fail(NAME, -1)  # down for good
    with pytest.raises(UnavailableError):
        run(_retrying(mem, sleep).read(NAME, 10, 5))


def test_attempts_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RetryingBackend(MemoryBackend(), attempts=0)
    with pytest.raises(ValueError):
        TimeoutBackend(MemoryBackend(), 0)


class Hung(Backend):
    """A backend whose reads wait for an event that is never set (a stalled server)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.cancelled = 0

    async def read(self, blob: str, offset: int, size: int) -> bytes:
        try:
            await self.event.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return b""

    async def read_many(self, requests: Sequence[RangeRequest]) -> list[bytes]:
        return [await self.read(r.blob, r.offset, r.size) for r in requests]


def test_timeout_becomes_unavailable() -> None:
    hung = Hung()
    be = TimeoutBackend(hung, 0.05)  # a bound on how long the test may take, not a timing check

    async def go() -> None:
        with pytest.raises(UnavailableError, match="timed out"):
            await be.read(NAME, 0, 1)
        with pytest.raises(UnavailableError, match="timed out"):
            await be.read_many([RangeRequest(NAME, 0, 1)])
    run(go())
    assert hung.cancelled == 2  # the stalled attempt was abandoned, not leaked


def test_timeout_inside_retry_retries_each_attempt() -> None:
    sleep = FakeSleep()
    hung = Hung()
    be = _retrying(TimeoutBackend(hung, 0.02), sleep, attempts=2)
    with pytest.raises(UnavailableError, match="gave up after 2 attempts"):
        run(be.read(NAME, 0, 1))
    assert hung.cancelled == 2


def test_timeout_passes_results_and_errors_through() -> None:
    be = TimeoutBackend(MemoryBackend({NAME: DATA}), 5)
    assert run(be.read(NAME, 1, 2)) == DATA[1:3]
    with pytest.raises(NotFoundError):
        run(be.read(MISSING, 0, 1))


def test_counting() -> None:
    seen: list[tuple[str, int, int]] = []
    be = CountingBackend(MemoryBackend({NAME: DATA}), observer=lambda *a: seen.append(a))

    async def go() -> None:
        await be.read(NAME, 0, 100)
        await be.read_many([RangeRequest(NAME, 50, 100), RangeRequest(NAME, 1000, 10),
                            RangeRequest(NAME, 150, 0)])
        await be.read(NAME, 1010, 5)  # touches the previous interval: merged
        with pytest.raises(NotFoundError):
            await be.read(MISSING, 0, 1)
    run(go())
    assert (be.calls, be.reads, be.bytes_read, be.errors) == (4, 5, 215, 1)
    assert be.ranges == {NAME: [(0, 150), (1000, 1015)]}
    assert be.fetched(NAME) == 165 and be.fetched(MISSING) == 0
    assert seen[0] == (NAME, 0, 100) and len(seen) == 5
    be.reset()
    assert (be.calls, be.reads, be.bytes_read, be.errors, be.ranges) == (0, 0, 0, 0, {})


def test_counting_intervals_collapse() -> None:
    be = CountingBackend(MemoryBackend({NAME: DATA}))
    chunk = 512
    offsets = list(range(0, len(DATA), chunk))
    for off in offsets[::2] + offsets[1::2]:  # every other chunk, then the gaps
        run(be.read(NAME, off, chunk))
    assert be.ranges[NAME] == [(0, len(DATA))]  # bounded by layout, however many reads


def test_wrappers_forward_read_many_and_close() -> None:
    inner = Flaky([])
    closed: list[bool] = []

    async def close() -> None:
        closed.append(True)

    inner.close = close  # type: ignore[method-assign]
    be = CountingBackend(RetryingBackend(TimeoutBackend(inner, 5)))
    run(be.read_many([RangeRequest(NAME, 0, 1)] * 3))
    assert inner.batches == 1 and inner.reads == 0
    run(be.close())
    assert closed == [True]
