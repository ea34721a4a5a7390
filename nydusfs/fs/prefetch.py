"""Background prefetch: pull an image's chunks in before anyone reads them.

Filesystem layer, above ``ImageFS``; it only calls ``ImageFS.chunks(..., background=True)``,
so every byte it brings in is verified and cached exactly like an on-demand read, and on-demand
reads always go first (a background fetch waits while any on-demand read is running).

Two phases, in order:

1. ``"list"``: the chunks of the bootstrap's prefetch list (the files a container reads at
   start), in list order;
2. ``"all"`` (only with ``all=True``): every other chunk of the image, in blob order, so a full
   prefetch reads each blob front to back and the mount then works with the backend gone.
   Over a per-chunk backend (``backend.per_chunk``) that does not warm (below) the order is
   *rotated*: the queue of batches starts at a random batch (``rng``, per mount) and wraps
   around, so many nodes prefetching at once each fetch a different part first rather than
   all waiting on the node slightly ahead. Batches stay intact and in blob order after the
   start; the list phase is never rotated (it is what a starting container reads first).

Over a backend with a node-level store (``backend.warms``: the P2P agent, whose store is the
node's cache) the ``all`` phase *warms* instead of reading: the store is asked to hold each
chunk, and only what it cannot hold is read and verified here (``ImageFS.warm``). Its batches
are big (``WARM_BATCH_*``) and in blob order, not rotated: the agent fetches each batch as a
pipeline, and nodes that ask for the same chunks in the same order share the work through the
supernode's leases (``dfagent.peer.fetcher``, "Bulk"). At least ``WARM_IN_FLIGHT`` batches are
asked for at once (the agent's bulk fetches share one window, so this costs nothing but a
request each): with ``concurrency`` of them, the image's last batch started only when its
first had ended, and in the fan-out every node then fetched that last 397-chunk region at the
same moment, at the end, in 6-10 s while the links idled. The chunks
are verified by the store as they arrive and by the filesystem on every read; reading them
here too would only double the node's CPU per byte (``storage.base``, "Node-level stores").
With such a backend, a mount after a full prefetch keeps working while the agent lives or
the image's own source answers, not with both gone: the chunks are in the agent's store.

Chunks are grouped into batches of about ``batch_bytes`` compressed bytes, so neighbouring chunks
become one ranged read; up to ``concurrency`` batches are in flight. A token bucket over
compressed bytes holds the rate to ``bandwidth`` bytes/s.

The list is what a starting container is about to read, so the mount fetches it differently
(``list_priority``, ``list_batch_bytes``): at the priority of readahead rather than in the
background — a starting program reads almost all the time, and background work that waits
for its reads to end would wait for the whole start — and in small batches, so chunks arrive
in list order at the link's rate and a reader waiting for one of them waits for a small
batch, not for megabytes that happen to share its request.

What prefetch must never do: crash or stall the mount, or retry without end. A batch that fails
(``FsError``) is counted in ``failed_chunks`` and skipped — a later on-demand read of those
chunks tries again and reports the error to its reader. ``run()`` lets no exception out except
``CancelledError`` when its task is cancelled (``stop()`` cancels and swallows that).

Time is injected (``clock``, ``sleep``) so the rate limit is tested without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Literal

from nydusfs.config import PrefetchConfig
from nydusfs.format.records import ChunkRecord
from nydusfs.fs.model import FsError, ImageFS

__all__ = ["PrefetchState", "Prefetcher", "TokenBucket"]

log = logging.getLogger(__name__)

MiB = 1 << 20

# Batches of the ``all`` phase over a backend that warms (the P2P agent): the agent fetches
# each as a pipeline, so bigger is better, up to what one local-API request may carry.
WARM_BATCH_CHUNKS = 1024
WARM_BATCH_BYTES = 64 * MiB
# Warm batches in flight at once, at least (``prefetch.concurrency`` may ask for more): an
# image of up to this many batches (1 GiB of 64 MiB ones) is asked for whole from the start.
WARM_IN_FLIGHT = 16

PrefetchState = Literal["idle", "list", "all", "done", "failed", "cancelled"]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class TokenBucket:
    """Rate limit over bytes: ``rate`` bytes/s, holding at most ``burst`` bytes of credit.

    ``acquire(n)`` waits until the balance is not negative, then takes ``n``; the balance may go
    negative, so a request larger than the bucket still passes (and the next one pays for it)
    and progress never stalls. ``rate == 0`` means unlimited. Acquirers are served in order.
    """

    def __init__(self, rate: int, *, burst: int | None = None, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep) -> None:
        if rate < 0:
            raise ValueError(f"rate: must be >= 0, got {rate}")
        self.rate = rate
        self.burst = rate if burst is None else burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = 0.0  # start empty: no free burst at mount time
        self._last = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst),
                           self._tokens + (now - self._last) * self.rate)
        self._last = now

    async def acquire(self, n: int) -> None:
        if self.rate == 0:
            return
        async with self._lock:
            self._refill()
            if self._tokens < 0:
                await self._sleep(-self._tokens / self.rate)
                self._refill()
                # Clamp float rounding: the debt is paid, whatever the last bits say.
                self._tokens = max(self._tokens, 0.0)
            self._tokens -= n


class Prefetcher:
    """Fetches the prefetch list, then (``all``) every chunk, in the background of one mount.

    Progress, for ``nydusfs stat`` and metrics: ``state``, ``total_chunks``/``done_chunks``/
    ``failed_chunks`` and ``total_bytes``/``done_bytes`` (uncompressed), or ``snapshot()``.
    ``done_chunks + failed_chunks`` reaches ``total_chunks`` when the run ends.

    States: ``"idle"`` (not started) → ``"list"`` → ``"all"`` → ``"done"`` (every chunk fetched)
    or ``"failed"`` (finished, but some chunks could not be fetched, or the chunk lists could not
    be read); ``"cancelled"`` if the task was cancelled first.
    """

    def __init__(
        self,
        fs: ImageFS,
        *,
        all: bool,  # shadows the builtin to match PrefetchConfig.all
        bandwidth: int,
        concurrency: int,
        batch_bytes: int = 4 * MiB,
        list_batch_bytes: int | None = None,
        list_priority: bool = False,
        rotate: bool | None = None,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """``list_batch_bytes``: batch size of the list phase (default ``batch_bytes``);
        ``list_priority``: fetch the list without waiting for on-demand reads (see the module
        docstring); the ``all`` phase always waits. ``rotate``: start the ``all`` phase at a
        random batch chosen with ``rng`` (``None``: when the backend is per-chunk)."""
        if bandwidth < 0:
            raise ValueError(f"prefetch.bandwidth: must be >= 0, got {bandwidth}")
        if concurrency < 1:
            raise ValueError(f"prefetch.concurrency: must be >= 1, got {concurrency}")
        if batch_bytes < 1:
            raise ValueError(f"batch_bytes: must be >= 1, got {batch_bytes}")
        if list_batch_bytes is not None and list_batch_bytes < 1:
            raise ValueError(f"list_batch_bytes: must be >= 1, got {list_batch_bytes}")
        self.fs = fs
        self.all = all
        self.bandwidth = bandwidth
        self.concurrency = concurrency
        self.batch_bytes = batch_bytes
        self.list_batch_bytes = batch_bytes if list_batch_bytes is None else list_batch_bytes
        self.list_priority = list_priority
        self.warms = bool(getattr(fs.backend, "warms", False))
        if rotate is None:
            rotate = bool(getattr(fs.backend, "per_chunk", False)) and not self.warms
        self.rotate = rotate
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        # Credit for one second or one batch, whichever is larger: never less than a batch.
        self._bucket = TokenBucket(bandwidth, burst=max(bandwidth, batch_bytes),
                                   clock=clock, sleep=sleep)
        self.state: PrefetchState = "idle"
        self.total_chunks = 0
        self.done_chunks = 0
        self.failed_chunks = 0
        self.total_bytes = 0
        self.done_bytes = 0
        self.error: str | None = None  # why the run failed as a whole, if it did
        self._started: float | None = None
        self._finished: float | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, fs: ImageFS, cfg: PrefetchConfig, *, batch_bytes: int = 4 * MiB,
                    clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> Prefetcher:
        return cls(fs, all=cfg.all, bandwidth=cfg.bandwidth, concurrency=cfg.concurrency,
                   batch_bytes=batch_bytes, clock=clock, sleep=sleep)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Run in a task on the running loop (the mount calls this once it is ready)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="prefetch")
        return self._task

    async def stop(self) -> None:
        """Cancel the task from ``start()`` and wait for it to end; never raises."""
        task = self._task
        if task is None or task.done():
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            # Our own cancellation of the prefetch task, not of the caller: swallow it
            # only then, so a caller being cancelled still sees its CancelledError.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise

    async def run(self) -> None:
        """Both phases, to the end. Only ``CancelledError`` escapes (state ``"cancelled"``)."""
        self._started = self._clock()
        try:
            await self._run()
        except asyncio.CancelledError:
            self.state = "cancelled"
            raise
        except Exception as exc:  # a bug must not take the mount down: log it, report it
            log.exception("prefetch failed")
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._finished = self._clock()

    async def _run(self) -> None:
        try:
            listed = _unique(self.fs.prefetch_list_chunks())
            seen = {r.digest for r in listed}
            rest = [r for r in self.fs.chunks_in_blob_order() if r.digest not in seen] \
                if self.all else []
        except FsError as exc:
            self.state = "failed"
            self.error = f"reading the chunk lists: {exc}"
            return
        rest = _unique(rest)
        self.total_chunks = len(listed) + len(rest)
        self.total_bytes = sum(r.uncompressed_size for r in listed) + \
            sum(r.uncompressed_size for r in rest)
        self.state = "list"
        await self._phase(listed, self.list_batch_bytes, priority=self.list_priority)
        if self.all:
            self.state = "all"
            if self.warms:  # few big batches: the agent pipelines each (module docstring)
                await self._phase(rest, WARM_BATCH_BYTES, priority=False, rotate=self.rotate,
                                  max_chunks=WARM_BATCH_CHUNKS,
                                  concurrency=max(self.concurrency, WARM_IN_FLIGHT))
            else:
                await self._phase(rest, self.batch_bytes, priority=False, rotate=self.rotate)
        self.state = "failed" if self.failed_chunks else "done"

    # ---- work ----------------------------------------------------------------------------

    def _batches(self, records: Sequence[ChunkRecord], batch_bytes: int | None = None,
                 max_chunks: int = 0) -> list[list[ChunkRecord]]:
        """Consecutive chunks, about ``batch_bytes`` (default ``self.batch_bytes``) compressed
        each (one chunk at least), and at most ``max_chunks`` (0: no limit)."""
        limit = self.batch_bytes if batch_bytes is None else batch_bytes
        out: list[list[ChunkRecord]] = []
        batch: list[ChunkRecord] = []
        size = 0
        for rec in records:
            if batch and (size + rec.compressed_size > limit
                          or 0 < max_chunks <= len(batch)):
                out.append(batch)
                batch, size = [], 0
            batch.append(rec)
            size += rec.compressed_size
        if batch:
            out.append(batch)
        return out

    async def _phase(self, records: Sequence[ChunkRecord], batch_bytes: int, *,
                     priority: bool, rotate: bool = False, max_chunks: int = 0,
                     concurrency: int = 0) -> None:
        """``records`` in batches, ``concurrency`` (default ``self.concurrency``) at a time."""
        queue = self._batches(records, batch_bytes, max_chunks)
        if rotate and len(queue) > 1:
            start = self._rng.randrange(len(queue))
            queue = queue[start:] + queue[:start]
        queue.reverse()  # pop() from the end takes them in order

        async def worker() -> None:
            while queue:
                batch = queue.pop()
                await self._bucket.acquire(sum(r.compressed_size for r in batch))
                try:
                    if priority:
                        await self.fs.chunks(batch, priority=True)
                    else:
                        rest = await self.fs.warm(batch)
                        if rest:
                            await self.fs.chunks(rest, background=True)
                except FsError as exc:
                    self.failed_chunks += len(batch)
                    log.warning("prefetch: %d chunks not fetched: %s", len(batch), exc)
                else:
                    self.done_chunks += len(batch)
                    self.done_bytes += sum(r.uncompressed_size for r in batch)

        async with asyncio.TaskGroup() as tg:
            for _ in range(min(concurrency or self.concurrency, len(queue))):
                tg.create_task(worker())

    # ---- progress ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """Progress as plain values (``nydusfs stat``, the status endpoint, metrics)."""
        if self._started is None:
            elapsed = 0.0
        else:
            end = self._finished if self._finished is not None else self._clock()
            elapsed = end - self._started
        return {
            "state": self.state,
            "all": self.all,
            "total_chunks": self.total_chunks,
            "done_chunks": self.done_chunks,
            "failed_chunks": self.failed_chunks,
            "total_bytes": self.total_bytes,
            "done_bytes": self.done_bytes,
            "bandwidth": self.bandwidth,
            "concurrency": self.concurrency,
            "elapsed_seconds": elapsed,
            "error": self.error,
        }


def _unique(records: Iterable[ChunkRecord]) -> list[ChunkRecord]:
    seen: set[bytes] = set()
    out: list[ChunkRecord] = []
    for r in records:
        if r.digest not in seen:
            seen.add(r.digest)
            out.append(r)
    return out
