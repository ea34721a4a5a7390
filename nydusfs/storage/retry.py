"""Wrappers that add cross-cutting behaviour to any backend: timeout, retry, counting.

Each is a :class:`~nydusfs.storage.base.Backend` around another one, so behaviour is written
once and stacked in one place (``nydusfs.storage.create_backend``) instead of being repeated in
every backend. Every wrapper forwards ``read_many`` to the inner ``read_many``, so a backend's
batching (merged preads, multi-range GETs) survives the stack.
"""

from __future__ import annotations

import asyncio
import bisect
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from nydusfs.errors import StorageError, UnavailableError
from nydusfs.storage.base import Backend, RangeRequest, Sink

__all__ = ["CountingBackend", "RetryingBackend", "TimeoutBackend"]

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[object]]


class TimeoutBackend(Backend):
    """Bounds every call by ``timeout`` seconds; running out is ``UnavailableError``.

    A hung NFS server or a stalled connection must become a retryable failure, not a read that
    never returns (the FUSE request would hang the reading process). For ``read_many`` the bound
    covers the whole batch.
    """

    def __init__(self, inner: Backend, timeout: float) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self.inner = inner
        self.timeout = timeout
        self.name = inner.name

    async def _bounded(self, what: str, op: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await op
        except TimeoutError as exc:
            raise UnavailableError(f"{what}: timed out after {self.timeout:g}s") from exc

    async def read(self, blob: str, offset: int, size: int) -> bytes:
        return await self._bounded(f"{blob} {offset}+{size}", self.inner.read(blob, offset, size))

    async def read_many(self, requests: Sequence[RangeRequest]) -> list[bytes]:
        return await self._bounded(f"batch of {len(requests)} ranges",
                                   self.inner.read_many(requests))

    async def stream_many(self, requests: Sequence[RangeRequest], sink: Sink) -> None:
        await self._bounded(f"batch of {len(requests)} ranges",
                            self.inner.stream_many(requests, sink))

    async def warm(self, requests: Sequence[RangeRequest]) -> list[bool]:
        # Not bounded here: warming a batch of a whole-image prefetch may rightly take
        # minutes; the backend bounds it itself (dragonfly: while its agent answers).
        return await self.inner.warm(requests)

    async def close(self) -> None:
        await self.inner.close()


class RetryingBackend(Backend):
    """Retries ``UnavailableError`` with exponential backoff and full jitter.

    Delay before retry ``n`` (0-based) is ``rng() * min(max_delay, base_delay * 2**n)``: full
    jitter spreads the retries of many readers hit by one outage, so they do not return in
    lockstep. ``NotFoundError``, ``IntegrityError`` and anything else are final and pass
    straight through: retrying cannot make a missing blob appear or corrupt bytes good. After
    ``attempts`` failures the last error is raised as ``UnavailableError`` (the cause chained).
    ``sleep`` and ``rng`` are injected so tests never wait and can pin the jitter.
    """

    def __init__(self, inner: Backend, attempts: int = 4, base_delay: float = 0.05,
                 max_delay: float = 2.0, sleep: Sleep = asyncio.sleep,
                 rng: Callable[[], float] = random.random) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self.inner = inner
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.sleep = sleep
        self.rng = rng
        self.name = inner.name
        self.retries = 0  # retries performed (not first attempts); for tests and metrics

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        return self.rng() * min(self.max_delay, self.base_delay * 2.0 ** retry)

    async def _retrying(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(self.attempts):
            try:
                return await op()
            except UnavailableError as exc:
                if attempt + 1 >= self.attempts:
                    raise UnavailableError(
                        f"{what}: gave up after {self.attempts} attempts: {exc}") from exc
                self.retries += 1
                await self.sleep(self.delay(attempt))
        raise AssertionError("unreachable")  # the loop returns or raises

    async def read(self, blob: str, offset: int, size: int) -> bytes:
        return await self._retrying(f"{blob} {offset}+{size}",
                                    lambda: self.inner.read(blob, offset, size))

    async def read_many(self, requests: Sequence[RangeRequest]) -> list[bytes]:
        return await self._retrying(f"batch of {len(requests)} ranges",
                                    lambda: self.inner.read_many(requests))

    async def stream_many(self, requests: Sequence[RangeRequest], sink: Sink) -> None:
        # A retry streams the ranges again from their start: the sink skips what it has.
        await self._retrying(f"batch of {len(requests)} ranges",
                             lambda: self.inner.stream_many(requests, sink))

    async def warm(self, requests: Sequence[RangeRequest]) -> list[bool]:
        return await self._retrying(f"warming {len(requests)} chunks",
                                    lambda: self.inner.warm(requests))

    async def close(self) -> None:
        await self.inner.close()


class CountingBackend(Backend):
    """Counts what the layers above asked for and got: calls, ranges, bytes, errors.

    The filesystem's tests use it to prove laziness ("reading one file fetched only its
    chunks") and metrics read it. ``ranges[blob]`` is the union of byte intervals delivered,
    as sorted disjoint ``(start, end)`` pairs: it answers "what was fetched" while staying
    bounded by the blob's layout however long a mount runs. ``observer``, if given, is called
    with ``(blob, offset, size)`` for every delivered range (the metrics hook).
    """

    def __init__(self, inner: Backend, *,
                 observer: Callable[[str, int, int], None] | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.observer = observer
        self.reset()

    def reset(self) -> None:
        """Zero every counter (tests call this after mount-time reads)."""
        self.calls = 0  # read() and read_many() calls
        self.reads = 0  # ranges delivered; a read_many of n ranges counts n
        self.bytes_read = 0
        self.errors = 0  # calls that raised a StorageError
        self.warmed = 0  # chunks put in a node-level store without delivery (``warm``)
        self.ranges: dict[str, list[tuple[int, int]]] = {}

    def fetched(self, blob: str) -> int:
        """Distinct bytes of ``blob`` delivered so far (overlapping reads counted once)."""
        return sum(end - start for start, end in self.ranges.get(blob, ()))

    async def read(self, blob: str, offset: int, size: int) -> bytes:
        self.calls += 1
        try:
            data = await self.inner.read(blob, offset, size)
        except StorageError:
            self.errors += 1
            raise
        self._delivered(blob, offset, len(data))
        return data

    async def read_many(self, requests: Sequence[RangeRequest]) -> list[bytes]:
        self.calls += 1
        try:
            datas = await self.inner.read_many(requests)
        except StorageError:
            self.errors += 1
            raise
        for r, data in zip(requests, datas, strict=True):
            self._delivered(r.blob, r.offset, len(data))
        return datas

    async def stream_many(self, requests: Sequence[RangeRequest], sink: Sink) -> None:
        self.calls += 1
        try:
            await self.inner.stream_many(requests, sink)
        except StorageError:
            self.errors += 1
            raise
        for r in requests:
            self._delivered(r.blob, r.offset, r.size)

    async def warm(self, requests: Sequence[RangeRequest]) -> list[bool]:
        try:
            held = await self.inner.warm(requests)
        except StorageError:
            self.errors += 1
            raise
        self.warmed += sum(held)
        return held

    async def close(self) -> None:
        await self.inner.close()

    def _delivered(self, blob: str, offset: int, size: int) -> None:
        self.reads += 1
        self.bytes_read += size
        if size:
            _add_interval(self.ranges.setdefault(blob, []), offset, offset + size)
        if self.observer is not None:
            self.observer(blob, offset, size)


def _add_interval(intervals: list[tuple[int, int]], start: int, end: int) -> None:
    """Insert ``[start, end)`` into sorted disjoint intervals, merging overlaps and neighbours."""
    i = bisect.bisect_left(intervals, start, key=lambda iv: iv[1])  # first with end >= start
    j = i
    while j < len(intervals) and intervals[j][0] <= end:
        start, end = min(start, intervals[j][0]), max(end, intervals[j][1])
        j += 1
    intervals[i:j] = [(start, end)]
