"""The fetch path: store → supernode lookup → peers (verified) → source → store → announce.

:meth:`Fetcher.get_many` is the one way chunks enter a node. For each wanted chunk:

1. **Store**: a chunk the store holds is delivered from it (origin ``local``).
2. **Single flight**: a chunk some other request is already fetching is waited for, never
   fetched twice on one node at a time, whoever asks. The fetch runs as its own task, so a
   requester that goes away does not cancel it for the others.
3. **Lookup** with source leases: one batched supernode lookup for all remaining chunks,
   bounded by ``fetch.lookup_timeout``. Skipped while the agent is not registered (supernode
   down): the chunks go straight to the source, nothing waits on a dead supernode. Chunks the
   supernode leases to this node go to the source at once; chunks another peer is fetching
   under its lease go to that peer (its upload server answers when the chunk lands).
4. **Peers**, in rounds: each chunk goes to its best untried candidate — the one this node is
   asking least right now and that did not refuse it (429) in the last ``BUSY_PAUSE``
   seconds, the supernode's order breaking ties — chunks for one peer in batches (one
   request, framed response). Every chunk received is verified (decoded, blake3 against the
   digest *we* asked for) before it is stored or delivered. A peer that sends bad data is
   reported (``corrupt``), one that times out or refuses the connection is reported too, and
   both are skipped by this node for ``BAD_PEER_PAUSE`` seconds. A batch still running after
   ``fetch.hedge_after`` is *hedged*: its missing chunks are also asked of their next
   candidates, and whichever copy arrives first is used. Chunks a peer could not give *yet*
   (busy, or still on their way to it) and chunks refused a lease are looked up again (a
   pause of at most ``RETRY_PAUSE`` when a round brought nothing) until ``fetch.lease_wait``
   has passed with nothing moving — no chunk arrived, no source fetch of this node ended (or
   is running, for chunks refused a lease), no live peer fetching one of them under its
   lease — (or ``LEASE_WAITS`` times that in all); chunks every candidate failed go to the
   source. A request to one peer holds at most ``fetch.batch`` chunks and about
   ``PEER_BATCH_BYTES`` of them, so it ends in a predictable time on a shared link whatever
   the chunk sizes.
5. **Source**: what no peer delivered is read from its source location (nydusfs storage
   backends, the node's credentials; neighbouring ranges of a blob are merged by the backend,
   and streamed: ``stream_many``); each chunk is verified and stored as its last byte comes in.
   Chunks on their way here, from the source or a peer, are readable by the upload server
   meanwhile (cut-through: ``dfagent.peer.arrival``; the last piece only once verified).
6. Stored chunks are **announced** (queued, sent in batches); chunks evicted to make room are
   withdrawn.

**Bulk** fetches (``get_many(..., bulk=True)``: prefetch hints, ``deliver: none``, preheat;
many chunks nobody reads yet) run the same steps as a pipeline instead of in rounds: the chunks
are taken in the caller's order; the next of those still waiting, as many as fit in the room
left in ``BULK_WINDOW`` (bytes on their way from peers, shared by all bulk fetches of the node,
each always allowed its fair share of it; at least ``PEER_BATCH_BYTES``), are looked up (with
leases) whenever there is room or no source fetch runs; leased chunks go to the source at once,
and chunks at peers are asked for at once. While fewer than ``AHEAD_JOBS`` source fetches run
on the node it also *leases ahead*: a lookup for leases only (``expect`` false) on the next
chunks past the horizon that nobody held or leased at its last look, so every node keeps its
share of the source link busy and fetches about 1/N of the image from it (leases taken only
inside the horizon went to the node furthest ahead, whose uplink then had to serve a third of
the image to everyone).
Only what is about to be asked for is looked up, because a lookup also records the requester as
*expected* to hold those chunks, and the supernode points others at it. A peer that could not
give a chunk yet is asked again only after its other candidates. Rounds would leave links idle:
a round waits for its slowest batch, and its source fetch for its peer batches, before it asks
for more. When every node prefetches the same image in the same order they look at the same
horizon, so the supernode spreads that horizon's leases over the nodes (each holds at most its
lease budget) and each chunk crosses the source link once, then goes from its leaseholder, and
whoever got it next, to the rest: the source link and every node's links stay busy at once,
which is what reaching the fan-out lower bound needs (DESIGN §6). A chunk peers failed
``fetch.k`` times, and whatever is still waiting when nothing arrived on the node for
``LEASE_WAITS`` times ``fetch.lease_wait``, goes to the source; so does everything when the
agent has had no supernode since it started. In the end game (nothing left to look up or ask) a
peer request that brought no chunk, nor a ``PROGRESS_PIECE`` of one, for ``fetch.hedge_after``
is hedged: its missing chunks are looked up and asked of another candidate too, and the slower
copy is cancelled once the other landed. A request to a peer times out after
``fetch.peer_timeout`` without a chunk, or ``PROGRESS_PIECE`` bytes of one, arriving, not after
that long in all: a busy peer's shared uplink is slow, not dead. Source leases this node holds
are renewed while their source reads run (``_renew_leases``), however long they take. A
registration lost on the way (a loaded supernode missed a heartbeat) is waited out, not taken
as a reason to send an image to the source.

Nothing here raises for a chunk that cannot be had: each gets an :class:`Outcome` with a
:class:`~dfagent.errors.FetchError`. The supernode is reached through a :class:`Tracker`
(the agent's :class:`~dfagent.peer.swarm.Swarm`); ``None`` means no P2P, only the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import aiohttp

from dfagent.errors import FetchError, RequestError
from dfagent.metrics import PeerMetrics
from dfagent.peer.arrival import Arrival
from dfagent.peer.config import FetchConfig
from dfagent.peer.source import SourceLocation, SourcePool
from dfagent.peer.store import ChunkStore
from dfagent.supernode.client import LookupResult, PeerRef
from nydusfs.errors import IntegrityError, NotFoundError, StorageError
from nydusfs.format import chunkfile
from nydusfs.storage.base import RangeRequest

__all__ = ["BAD_PEER_PAUSE", "BULK_WINDOW", "BUSY_PAUSE", "ChunkWant", "Fetcher", "Outcome",
           "Tracker"]

log = logging.getLogger(__name__)

BAD_PEER_PAUSE = 30.0  # seconds this node skips a peer that sent bad data or timed out
BUSY_PAUSE = 0.5  # seconds a peer that answered 429 is asked only if no other candidate is free
RETRY_PAUSE = 0.25  # seconds before asking the supernode again when a round brought nothing
MAX_ROUNDS = 1000  # bound on lookup rounds per fetch (``fetch.lease_wait`` bounds the time)
LEASE_WAITS = 3  # a fetch waits on others at most this many ``fetch.lease_wait`` in all
PEER_BATCH_BYTES = 2 << 20  # source bytes of the chunks asked of one peer in one request
INLINE_VERIFY = 4 << 20  # chunks up to this size are verified on the event loop (as INLINE_IO)
PROGRESS_PIECE = 64 * 1024  # bytes of a chunk from a peer read (and counted as progress) at once
BULK_WINDOW = 32 << 20  # source bytes a node asks of peers at once in bulk fetches
BULK_LOOKUP = 256  # digests per bulk lookup (a busy supernode answers small ones in time)
SOURCE_PIECE = 1 << 20  # source bytes per read of a source fetch (one GET for neighbours)
SOURCE_PIECE_CHUNKS = 1024  # and at most this many chunks per read (tiny chunks: module doc)
SOURCE_LANES = 2  # reads of one source fetch running at once
AHEAD_JOBS = 2  # source fetches a node keeps running by leasing ahead (one starts as one ends)
MAX_BULK_STEPS = 100_000  # bound on the steps of one bulk fetch (time bounds it first)
DEFAULT_LEASE_TTL = 10.0  # seconds: leases.ttl when the supernode did not say (its default)
MAX_RENEWALS = 100_000  # bound on the renewal rounds of one run of ``_renew_leases``


@dataclass(frozen=True, slots=True)
class ChunkWant:
    """A chunk someone wants, and where its source has it (``source`` None: peers only)."""

    digest: str  # 64 hex
    source: SourceLocation | None = None
    blob: str = ""  # sha256 hex of the blob at the source
    offset: int = 0  # compressed extent in the blob
    size: int = 0
    uncompressed_size: int = 0  # 0: unknown (the chunk file says)
    flags: int = 0


@dataclass(slots=True)
class Outcome:
    """What became of one wanted chunk. ``data`` is the chunk file when it was just fetched
    (so it can be delivered without reading the store back), except in a bulk fetch
    (:class:`_Lean`)."""

    digest: str
    origin: str | None = None  # local | peer | source; None: failed
    data: bytes | None = None
    error: FetchError | None = None


class _Lean(dict[str, Outcome]):
    """A bulk fetch's outcomes, recorded without the chunk bytes. Its callers read nothing
    (prefetch, preheat), and a request of up to 1024 chunks would otherwise hold every chunk
    that landed until its last one did: agents in an 8-node fan-out grew to ~230 MiB of
    anonymous memory, each fresh page costing a fault (docs/benchmarks.md, section 8). A
    caller that wants the bytes of a chunk a bulk fetch brought reads the store."""


class Tracker(Protocol):
    """What the fetcher needs of the supernode side (implemented by ``swarm.Swarm``)."""

    @property
    def connected(self) -> bool: ...

    async def lookup(self, digests: list[str], sizes: Mapping[str, int] | None = None, *,
                     expect: bool = True) -> LookupResult | None: ...

    @property
    def lease_ttl(self) -> float | None:
        """Seconds a source lease lasts unless renewed (the supernode's ``leases.ttl``);
        None until a supernode said."""
        ...

    def announce(self, digests: Iterable[str]) -> None: ...

    def withdraw(self, digests: Iterable[str]) -> None: ...

    def report(self, peer_id: str, reason: str, digest: str | None) -> None: ...


async def _read_body(content: aiohttp.StreamReader, length: int, progress: asyncio.Timeout,
                     limit: float, mark: list[float] | None, arrival: Arrival | None) -> bytes:
    """``length`` bytes of a frame body, in ``PROGRESS_PIECE`` pieces; after each, ``progress``
    (a timeout on progress) is pushed ``limit`` seconds on, ``mark`` (the request's progress
    mark, for the end game's hedge) set to now, and the piece fed to ``arrival`` (peers may
    read the chunk from this node while it arrives). A 1 MiB chunk from a peer whose uplink
    dozens of requests share can take longer than ``fetch.peer_timeout``, and longer than
    ``fetch.hedge_after``, while its bytes keep coming.

    (Reading with the socket's ``SO_RCVLOWAT`` set to what of a piece had not arrived, one
    wake-up per piece instead of one per packet, saved about 5% of a fan-out's CPU, but a
    request in the bad-peer end-to-end test then stalled for ``fetch.peer_timeout`` about
    every other run; it was taken out.)"""
    loop = asyncio.get_running_loop()
    parts = []
    left = length
    while True:
        n = min(left, PROGRESS_PIECE)
        piece = await content.readexactly(n)
        if arrival is not None:
            arrival.feed(length - left, piece)
        parts.append(piece)
        left -= n
        progress.reschedule(loop.time() + limit)
        if mark is not None:
            mark[0] = time.monotonic()
        if left <= 0:
            return parts[0] if len(parts) == 1 else b"".join(parts)


class _Busy(Exception):
    pass


def _said(answer: tuple[str, list[PeerRef]] | None) -> str:
    """A bulk fetch's record of the last lookup answer for a chunk, for its log line."""
    if answer is None:
        return "never looked up"
    kind, peers = answer
    return f"{kind} {','.join(p.id for p in peers)}" if peers else kind


class Fetcher:
    """Gets chunks for the local API, the prefetcher and ``dfagent get`` (module docstring)."""

    def __init__(self, store: ChunkStore, sources: SourcePool, metrics: PeerMetrics,
                 config: FetchConfig, *, tracker: Tracker | None = None,
                 token: str | None = None) -> None:
        self.store = store
        self.sources = sources
        self.metrics = metrics
        self.config = config
        self.tracker = tracker
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._inflight: dict[str, asyncio.Future[Outcome]] = {}
        self._bad_until: dict[str, float] = {}
        self._busy_until: dict[str, float] = {}  # peers that answered 429 a moment ago
        self._asking: dict[str, int] = {}  # chunks this node is asking each peer for now
        # Chunks on their way here: asked of a peer, or read from the source, right now (a
        # count per digest: hedged chunks are asked twice). See :meth:`fetching`.
        self._coming: dict[str, int] = {}
        self._sourcing_now: dict[str, int] = {}  # of those, read from the source now
        # Chunks arriving now, readable by the upload server while they do (``arrival``), and
        # upload requests waiting for chunks to start arriving (``wait_ready``).
        self._arrivals: dict[str, Arrival] = {}
        self._ready_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._progress = asyncio.Event()  # replaced (after set) when a source batch ends
        self._source_slots = asyncio.Semaphore(config.concurrency)
        self._sourcing = 0  # source fetches (_from_source calls) running on this node
        # Chunks this node is fetching from the source under its leases (digest -> source
        # size), kept alive by ``_renew_leases`` until their source reads end.
        self._leased_now: dict[str, int] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._bulk_bytes = 0  # source bytes bulk fetches are asking of peers now
        self._bulk_loops = 0  # bulk fetches running now (they share BULK_WINDOW)
        self._arrived_at = 0.0  # when a chunk last arrived (monotonic), from anywhere
        self._seen_supernode = False  # registered at some point since the agent started
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[dict[str, Outcome]]] = set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64), headers=self._headers,
                cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    # -- the entry point ------------------------------------------------------------------

    async def get_many(self, wants: Sequence[ChunkWant], *, refetch: Iterable[str] = (),
                       bulk: bool = False) -> list[Outcome]:
        """An :class:`Outcome` per want, in order. ``refetch``: digests a client found bad
        or missing; the stored copy is verified in full and dropped if bad before use.
        ``bulk``: many chunks nobody is reading yet, fetched as a pipeline (module doc)."""
        t0 = time.monotonic()
        again = set(refetch)
        results: dict[str, Outcome] = {}
        waits: dict[str, asyncio.Future[Outcome]] = {}
        mine: dict[str, ChunkWant] = {}
        for w in wants:
            d = w.digest
            if d in results or d in waits or d in mine:
                continue
            if d in again and d in self.store:
                data = await self.store.read_verified(d, w.uncompressed_size or None)
                if data is None:
                    self.metrics.verification_failures.labels("store").inc()
                    if self.tracker is not None:
                        self.tracker.withdraw([d])
            if self.store.touch(d):
                results[d] = Outcome(d, origin="local")
                self.metrics.delivered("local", 0, time.monotonic() - t0)
            elif d in self._inflight:
                waits[d] = self._inflight[d]
            else:
                mine[d] = w
        if mine:
            loop = asyncio.get_running_loop()
            futs = {d: loop.create_future() for d in mine}
            self._inflight.update(futs)
            task = loop.create_task(self._bulk(mine, t0) if bulk else self._fetch(mine, t0))
            self._tasks.add(task)

            def done(t: asyncio.Task[dict[str, Outcome]]) -> None:
                self._tasks.discard(t)
                got = {} if t.cancelled() or t.exception() is not None else t.result()
                if not t.cancelled() and t.exception() is not None:
                    log.error("fetch failed: %r", t.exception())
                for d, fut in futs.items():
                    self._inflight.pop(d, None)
                    if not fut.done():
                        fut.set_result(got.get(d) or Outcome(d, error=FetchError(
                            f"chunk {d}: fetch interrupted")))

            task.add_done_callback(done)
            waits.update(futs)
        for d, fut in waits.items():
            results[d] = await asyncio.shield(fut)
        return [results[w.digest] for w in wants]

    async def _fetch(self, todo: dict[str, ChunkWant], t0: float) -> dict[str, Outcome]:
        out: dict[str, Outcome] = {}
        rest = dict(todo)
        to_source: dict[str, ChunkWant] = {}
        tracker = self.tracker
        # Waiting on other peers' fetches ends after ``lease_wait`` without anything moving,
        # or after LEASE_WAITS times that in all: while chunks keep landing, going to the
        # source for the rest would fetch what someone is about to have.
        wait = self.config.lease_wait
        start = time.monotonic()
        deadline = start + wait
        cap = start + wait * LEASE_WAITS
        failed = 0
        refused: set[str] = set()  # last refused a lease (this node's budget was full)
        looked_up = False  # rest: chunks whose wait on others ran out, not direct ones
        for _ in range(MAX_ROUNDS):
            looked_up = False
            if not rest or tracker is None or not tracker.connected:
                break
            found = await tracker.lookup(list(rest), {d: w.size for d, w in rest.items()})
            if found is None:
                break  # no supernode answer: the source
            looked_up = True
            cands = {d: ps for d, ps in found.chunks.items() if ps and d in rest}
            for d, p in found.fetching.items():
                if d in rest and d not in cands:
                    cands[d] = [p]  # it serves the chunk once its own source fetch lands
            jobs = []
            mine = {d: rest[d] for d in found.leases if d in rest and d not in cands}
            if mine:
                jobs.append(self._from_source(mine, out, t0, leased=True))
            retry: set[str] = set()
            if cands:
                jobs.append(self._from_peers({d: rest[d] for d in cands}, cands, out, t0,
                                             retry))
            progress = self._progress
            before = len(out)
            if jobs:
                await asyncio.gather(*jobs)
            again: dict[str, ChunkWant] = {}
            for d, w in rest.items():
                if d in out:
                    continue
                if d in retry or (d not in cands and d not in mine):
                    again[d] = w  # busy or not there yet, or a lease refused: ask again
                    if d not in cands:
                        refused.add(d)
                    else:
                        refused.discard(d)
                else:
                    to_source[d] = w  # every candidate failed
                    failed += 1
            rest = again
            now = time.monotonic()
            # Still moving: something arrived, a source fetch of this node ended or is running
            # while some of the rest were refused a lease (its end frees this node's budget),
            # or a live peer is fetching some of the rest under its lease (the supernode
            # still says so).
            if len(out) > before or progress.is_set() or \
                    any(d in rest for d in found.fetching) or \
                    (self._sourcing > 0 and any(d in refused for d in rest)):
                deadline = min(cap, now + wait)
            if not rest or now >= deadline:
                break
            if len(out) == before:
                # Nothing arrived this round: wait for this node's source fetches to free a
                # lease, or a moment, rather than asking the supernode in a tight loop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(RETRY_PAUSE,
                                                   max(0.0, deadline - time.monotonic()))):
                        await progress.wait()
        waited = refused_n = 0
        if looked_up:
            refused_n = sum(1 for d in rest if d in refused)
            waited = len(rest) - refused_n
        to_source.update(rest)
        m = self.metrics.source_fetches
        m.labels("failed").inc(failed)
        m.labels("waited").inc(waited)
        m.labels("refused").inc(refused_n)
        m.labels("direct").inc(len(to_source) - failed - waited - refused_n)
        return await self._finish(to_source, out, t0)

    async def _bulk(self, todo: dict[str, ChunkWant], t0: float) -> dict[str, Outcome]:
        """The pipelined fetch of many chunks (module docstring, "Bulk")."""
        out: dict[str, Outcome] = _Lean()
        tracker = self.tracker
        order = list(todo)
        head = 0  # order[:head] has arrived or goes to the source
        waiting: set[str] = set(todo)  # to look up (again)
        cands: dict[str, list[PeerRef]] = {}  # at (or coming to) peers, not asked yet
        failures: dict[str, int] = {}
        to_source: dict[str, ChunkWant] = {}
        jobs: dict[asyncio.Task[None], tuple[list[str], int, str]] = {}  # digests, bytes, peer
        # Peers that could not give a chunk yet: asked again only once every other candidate
        # was (the supernode also lists peers only *expected* to hold it, and asking the same
        # one again and again made the last chunks of an image take seconds).
        tried: dict[str, set[str]] = {}
        retry: set[str] = set()
        patience = self.config.lease_wait * LEASE_WAITS
        deadline = time.monotonic() + patience
        next_lookup = next_ahead = 0.0
        # Past the horizon: chunks held or leased elsewhere at the last look-ahead (skipped by
        # the next one, so it reaches the lease frontier in a step or two).
        elsewhere: set[str] = set()
        horizon: list[str] = []
        # The last lookup answer per chunk, and a state line a second: the debug trace that
        # tells a slow bulk fetch (waiting on whom, for what) from a busy link.
        answer: dict[str, tuple[str, list[PeerRef]]] = {}  # formatted only when logged
        trace = log.isEnabledFor(logging.DEBUG)
        next_trace = time.monotonic() + 1.0
        asked = 0  # source bytes this fetch is asking peers for now
        # Peer requests: when each was sent, or last brought a chunk (``_peer_batch`` updates).
        started: dict[asyncio.Task[None], list[float]] = {}
        hedged: set[asyncio.Task[None]] = set()  # slow ones whose chunks were asked again
        hedged_any = False
        self._bulk_loops += 1
        try:
            for _ in range(MAX_BULK_STEPS):
                if hedged_any:  # a hedged chunk may have arrived from either copy
                    waiting.difference_update(out)
                    for d in [d for d in cands if d in out]:
                        del cands[d]
                if not (waiting or cands or jobs):
                    break
                now = time.monotonic()
                if tracker is None:
                    break
                connected = tracker.connected
                if connected:
                    self._seen_supernode = True
                elif not self._seen_supernode:
                    break  # no supernode since the agent started: the source at once
                if trace and now >= next_trace:
                    next_trace = now + 1.0
                    log.debug("bulk %x at %.1f s: %d/%d arrived, %d waiting, %d candidates, "
                              "%d peer requests, %d source jobs, window %d bytes, head %d",
                              id(todo), now - t0, len(out), len(todo), len(waiting),
                              len(cands), sum(1 for _, n, _ in jobs.values() if n),
                              sum(1 for _, n, _ in jobs.values() if not n), self._bulk_bytes,
                              head)
                if now >= deadline:
                    # Nothing of ours arrived for a while; still waiting while the node as a
                    # whole receives (our turn comes when the window frees up).
                    if now - self._arrived_at >= patience:
                        stuck = [d for d in order if d not in out and d not in to_source]
                        log.info("bulk fetch: nothing arrived for %.0f s; %d chunks to the "
                                 "source, e.g. %s", patience, len(stuck), "; ".join(
                                     f"{d[:12]} {'waiting' if d in waiting else 'asked'} "
                                     f"({_said(answer.get(d))})" for d in stuck[:4]))
                        break
                    deadline = self._arrived_at + patience
                sourcing = any(not n for _, n, _ in jobs.values())
                # A lost registration (a heartbeat a loaded supernode did not answer in time) is
                # waited out: the swarm registers again within a second or two, and meanwhile
                # the candidates known and the fetches running go on.
                room = self._bulk_room(asked) - sum(todo[d].size for d in cands)
                if connected and waiting and now >= next_lookup and (
                        room >= PEER_BATCH_BYTES or not sourcing):
                    next_lookup = now + RETRY_PAUSE
                    while head < len(order) and (order[head] in out or order[head] in to_source):
                        head += 1
                    horizon = []
                    size = 0
                    limit = max(room, PEER_BATCH_BYTES)
                    for d in order[head:]:
                        if size >= limit or len(horizon) >= BULK_LOOKUP:
                            break
                        if d in waiting:
                            horizon.append(d)
                            size += todo[d].size
                    found = await tracker.lookup(horizon, {d: todo[d].size for d in horizon}) \
                        if horizon else None
                    if horizon and found is None:
                        # A slow answer from a loaded supernode is no reason to send a whole
                        # image to the source; a dead one is (the swarm's heartbeat tells it
                        # apart: ``connected``), or nothing arriving for ``patience``.
                        continue
                    if found is not None:
                        for d in horizon:
                            ps = found.chunks.get(d) or \
                                ([found.fetching[d]] if d in found.fetching else [])
                            if ps:
                                waiting.discard(d)
                                cands[d] = ps
                            answer[d] = ("fetching" if d in found.fetching else "at" if ps
                                         else "leased" if d in found.leases else "refused", ps)
                        mine = {d: todo[d] for d in found.leases if d in waiting}
                        if mine:
                            waiting.difference_update(mine)
                            task = asyncio.create_task(self._from_source(mine, out, t0,
                                                                          leased=True))
                            jobs[task] = (list(mine), 0, "")
                if connected and waiting and self._sourcing < AHEAD_JOBS and \
                        time.monotonic() >= next_ahead and \
                        sum(1 for _, n, _ in jobs.values() if not n) < AHEAD_JOBS:
                    next_ahead = time.monotonic() + RETRY_PAUSE
                    mine = await self._lease_ahead(order, head, horizon, waiting, elsewhere,
                                                   todo)
                    if mine:
                        task = asyncio.create_task(self._from_source(mine, out, t0,
                                                                      leased=True))
                        jobs[task] = (list(mine), 0, "")
                for p, ds in self._bulk_batches(cands, todo, tried, waiting,
                                                self._bulk_room(asked)):
                    n = sum(todo[d].size for d in ds)
                    self._bulk_bytes += n
                    asked += n
                    mark = [time.monotonic()]
                    task = asyncio.create_task(self._peer_batch(p, ds, todo, out, t0, retry,
                                                                mark))
                    jobs[task] = (ds, n, p.id)
                    started[task] = mark
                hedge_at = self._bulk_hedge(jobs, started, hedged, cands, out, waiting, tried)
                hedged_any = hedged_any or bool(hedged)
                # When to look again: at the next lookup, or in a moment if one was due but not
                # made (unregistered, or enough candidates while a source fetch runs); never at
                # once, or this loop would spin.
                pause = next_lookup - time.monotonic()
                if pause <= 0:
                    pause = RETRY_PAUSE
                if not jobs:
                    # Nothing on its way: wait for a lease to free up or for the next lookup.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(pause):
                            await self._progress.wait()
                    continue
                wake = pause if waiting else None
                if hedge_at is not None:
                    wake = min(wake or patience, max(0.01, hedge_at - time.monotonic()))
                done, _ = await asyncio.wait(jobs, timeout=wake,
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    ds, n, peer_id = jobs.pop(task)
                    started.pop(task, None)
                    self._bulk_bytes -= n
                    asked -= n
                    was_hedged = task in hedged
                    hedged.discard(task)
                    for d in ds:
                        if d in out:
                            deadline = time.monotonic() + patience
                            tried.pop(d, None)
                            continue
                        if was_hedged:
                            retry.discard(d)
                            continue  # asked again when it was hedged
                        if peer_id:
                            tried.setdefault(d, set()).add(peer_id)
                        if d in retry:
                            retry.discard(d)
                            waiting.add(d)  # busy or not there yet: look it up again
                        else:
                            failures[d] = failures.get(d, 0) + 1
                            if failures[d] >= self.config.k:
                                to_source[d] = todo[d]
                            else:
                                waiting.add(d)
            # What is on its way lands (a peer request ends within fetch.peer_timeout, a
            # source read within its backend's timeouts) rather than being fetched again.
            await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            for task in jobs:  # still running only when this fetch itself was cancelled
                task.cancel()
            self._bulk_bytes -= sum(n for _, n, _ in jobs.values())
            self._bulk_loops -= 1
        m = self.metrics.source_fetches
        m.labels("failed").inc(len(to_source))
        rest = {d: todo[d] for d in todo if d not in out and d not in to_source}
        m.labels("waited").inc(len(rest))
        to_source.update(rest)
        log.info("bulk fetch of %d chunks: %d arrived in %.1f s; %d to the source (%d failed "
                 "at peers)", len(todo), len(out), time.monotonic() - t0, len(to_source),
                 sum(1 for n in failures.values() if n >= self.config.k))
        return await self._finish(to_source, out, t0)

    async def _lease_ahead(self, order: list[str], head: int, horizon: list[str],
                           waiting: set[str], elsewhere: set[str], todo: dict[str, ChunkWant]
                           ) -> dict[str, ChunkWant]:
        """Keep this node's share of the source link busy: with fewer than ``AHEAD_JOBS``
        source fetches running on the node, ask for leases (only: ``expect`` false) on the
        next chunks past ``horizon`` that nobody held or leased at the last look; those
        granted (taken out of ``waiting``) are the caller's to fetch from the source.

        Why: leases taken only inside the horizon go to whichever node is furthest ahead.
        That node then fetched a third of the image from the source and had to upload it
        to everyone, its uplink the bottleneck of the whole fan-out, while the nodes behind
        it never reached the lease frontier. With every node leasing ahead whenever its
        source share is idle, each fetches about 1/N of the image from the source and the
        registry link stays busy."""
        tracker = self.tracker
        assert tracker is not None
        skip = set(horizon)
        ahead: list[str] = []
        for d in order[head:]:
            if len(ahead) >= BULK_LOOKUP:
                break
            if d in waiting and d not in skip and d not in elsewhere:
                ahead.append(d)
        if not ahead:
            return {}
        found = await tracker.lookup(ahead, {d: todo[d].size for d in ahead}, expect=False)
        if found is None:
            return {}
        for d in ahead:
            if found.chunks.get(d) or d in found.fetching:
                elsewhere.add(d)
        mine = {d: todo[d] for d in found.leases if d in waiting}
        waiting.difference_update(mine)
        return mine

    def _bulk_hedge(self, jobs: Mapping[asyncio.Task[None], tuple[list[str], int, str]],
                    started: dict[asyncio.Task[None], list[float]],
                    hedged: set[asyncio.Task[None]],
                    cands: Mapping[str, list[PeerRef]], out: Mapping[str, Outcome],
                    waiting: set[str], tried: dict[str, set[str]]) -> float | None:
        """The end game of a bulk fetch: with nothing left to look up or ask, the chunks of a
        peer request that brought nothing for ``fetch.hedge_after`` go back to waiting (looked
        up and asked of another candidate; the slow peer counts as tried) while it goes on,
        and a hedged request whose chunks all arrived elsewhere is cancelled. When the next
        request becomes slow (monotonic), or None. (Cancelling the stalled request at once
        instead sent no chunk twice, 5-18 MB per node of an image before, yet the fan-out
        took 1-2 s longer: the stalled request was usually about to deliver.)

        Why: a node's last chunks often sat for seconds in one request to a peer whose
        uplink was shared by thirty others, while other holders were idle; nothing else was
        left to ask for, so the node's links stood still until that request ended."""
        for task in list(hedged):
            if not task.done() and all(d in out for d in jobs[task][0]):
                task.cancel()  # the loser of a hedge: frees the slow peer's uplink
        if cands or waiting:
            return None
        now = time.monotonic()
        limit = self.config.hedge_after
        first: float | None = None
        for task, mark in started.items():
            if task in hedged:
                continue
            ds, _, peer_id = jobs[task]
            # Stalled: nothing arrived on it for ``limit``, not a chunk nor a PROGRESS_PIECE
            # of one (not merely slow: hedging requests that were moving sent a tenth of the
            # bytes twice). Counting whole chunks only, a 1 MiB chunk from a peer whose
            # uplink thirty requests share looked stalled after two seconds: each node of the
            # fan-out received ~10 MB of its 201 MB image twice; with pieces, ~1 MB.
            at = mark[0]
            if now - at < limit:
                first = at + limit if first is None else min(first, at + limit)
                continue
            hedged.add(task)
            for d in ds:
                if d not in out:
                    tried.setdefault(d, set()).add(peer_id)
                    waiting.add(d)
        return first

    def _bulk_room(self, asked: int) -> int:
        """Bytes a bulk fetch that is asking peers for ``asked`` bytes may ask for more:
        what is left of ``BULK_WINDOW``, and at least what is left of its fair share of it.

        Why the share: the window used to go to whoever asked first. Fetches of big chunks
        kept it full, and a prefetch batch of 1,024 small chunks, with hundreds of
        candidates ready, sent no request for ten seconds and finished last."""
        share = BULK_WINDOW // max(1, self._bulk_loops)
        return max(BULK_WINDOW - self._bulk_bytes, share - asked)

    def _bulk_batches(self, cands: dict[str, list[PeerRef]], todo: dict[str, ChunkWant],
                      tried: dict[str, set[str]], waiting: set[str], room: int
                      ) -> list[tuple[PeerRef, list[str]]]:
        """Requests to peers for candidates in ``cands`` (taken out of it), in its order,
        while this node's bulk bytes on their way from peers stay under ``BULK_WINDOW``:
        each chunk from its best candidate now (``_choose``), one not in ``tried[d]`` while
        there is one, at most ``fetch.batch`` chunks and about ``PEER_BATCH_BYTES`` per
        request. ``room``: bytes it may ask for (``_bulk_room``)."""
        groups: dict[str, tuple[PeerRef, list[str], int]] = {}
        batches: list[tuple[PeerRef, list[str]]] = []
        for d in list(cands):
            if room <= 0:
                break
            p = self._choose(cands[d], tried.get(d, set()))
            if p is None and d in tried:
                del tried[d]  # every candidate was tried: start over
                p = self._choose(cands[d], set())
            if p is None:  # every candidate is paused as bad: look it up again (others, or
                del cands[d]  # the source once nobody else has it)
                waiting.add(d)
                continue
            del cands[d]
            n = todo[d].size
            room -= n
            _, ds, size = groups.get(p.id, (p, [], 0))
            if ds and (len(ds) >= self.config.batch or size + n > PEER_BATCH_BYTES):
                batches.append((p, ds))
                ds, size = [], 0
            ds.append(d)
            groups[p.id] = (p, ds, size + n)
            self._asking[p.id] = self._asking.get(p.id, 0) + 1  # counts while choosing
        for p, ds, _ in groups.values():
            batches.append((p, ds))
        for p, ds in batches:
            self._asking[p.id] -= len(ds)
        return [(p, ds) for p, ds in batches if ds]

    async def _finish(self, to_source: dict[str, ChunkWant], out: dict[str, Outcome],
                      t0: float) -> dict[str, Outcome]:
        """The end of a fetch: what peers did not deliver from the source; failures counted."""
        if to_source:
            await self._from_source(to_source, out, t0)
        self.metrics.fetch_failures.inc(sum(1 for o in out.values() if o.origin is None))
        return out

    def _settle(self, outcome: Outcome, out: dict[str, Outcome]) -> None:
        """Record ``outcome`` and wake whoever waits for that chunk on this node at once
        (other requests, and upload requests from peers that were pointed here)."""
        data = outcome.data
        if data is not None and isinstance(out, _Lean):
            outcome = replace(outcome, data=None)
        out[outcome.digest] = outcome
        self._arrived_at = time.monotonic()
        a = self._arrivals.get(outcome.digest)
        if a is not None and a.ok is None and data is not None:
            # Another copy's arrival, read by peers (a hedge's slower copy, cancelled next):
            # they get the rest from this one rather than being cut off, and reporting this
            # healthy node.
            a.complete(data)
            self._gone(a)
        fut = self._inflight.get(outcome.digest)
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    async def wait_ready(self, digests: Iterable[str], timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until one of ``digests`` has started arriving
        here (:meth:`arrival`), landed or failed; at once if one has. The upload server
        serves chunks that were asked of it while still on their way here."""
        # One future for the whole call, woken by whichever digest starts arriving
        # (``_arrive``) or ends (its fetch's future): a shield and a future per digest of a
        # batch, and waiting on all of them, was ~3% of a busy peer's Python time.
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake(_: object = None) -> None:
            if not ready.done():
                ready.set_result(None)

        mine: list[tuple[str, asyncio.Future[Outcome]]] = []
        for d in digests:
            fut = self._inflight.get(d)
            if d in self._arrivals or fut is None or fut.done():
                break
            self._ready_waiters.setdefault(d, []).append(ready)
            fut.add_done_callback(wake)
            mine.append((d, fut))
        else:
            if mine:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await ready
        for d, fut in mine:
            fut.remove_done_callback(wake)
            left = self._ready_waiters.get(d)
            if left is not None:
                with contextlib.suppress(ValueError):
                    left.remove(ready)
                if not left:
                    del self._ready_waiters[d]

    def arrival(self, digest: str) -> Arrival | None:
        """``digest`` as it arrives here now, if it does (``dfagent.peer.arrival``)."""
        return self._arrivals.get(digest)

    def _arrive(self, digest: str, length: int) -> Arrival:
        """A new arrival of ``digest`` (a chunk file of ``length`` bytes), readable by the
        upload server unless another copy of it is arriving already (a hedge's)."""
        a = Arrival(digest, length)
        if digest not in self._arrivals:
            self._arrivals[digest] = a
            for ready in self._ready_waiters.pop(digest, ()):
                if not ready.done():
                    ready.set_result(None)
        return a

    def _gone(self, a: Arrival, ok: bool = False) -> None:
        """``a`` ended (verified and stored, or failed): no longer readable as arriving."""
        a.finish(ok)
        if self._arrivals.get(a.digest) is a:
            del self._arrivals[a.digest]

    def fetching(self, digest: str) -> bool:
        """Whether ``digest`` is on its way here now: asked of a peer or read from the source,
        not merely wanted. The upload server waits up to ``INFLIGHT_WAIT`` for such a chunk.

        Why not "wanted": every chunk of a running bulk fetch is wanted from its start, most
        of them not yet asked of anyone. When every node started the image's last prefetch
        batch at once, each was pointed at the others (expected to hold those chunks), each
        waited 1.5 s at a peer that had not asked for the chunk either, and the links stood
        idle for seconds before the fan-out ended."""
        if self._coming.get(digest, 0) <= 0:
            return False
        fut = self._inflight.get(digest)
        return fut is None or not fut.done()  # arrived: no longer on its way

    def from_source(self, digest: str) -> bool:
        """Whether ``digest`` is being read from the source here (under this node's lease):
        it comes for sure. One asked of a peer may be waited on by that peer in turn (peers
        *expected* to hold a chunk are pointed at each other), so the upload server waits
        for it only briefly (``upload.PEER_WAIT``)."""
        return self._sourcing_now.get(digest, 0) > 0

    def _on_way(self, digests: Iterable[str], n: int, *, source: bool = False) -> None:
        """Count ``digests`` as on their way here (``n`` 1) or no longer (``n`` -1)."""
        for counts in (self._coming, self._sourcing_now) if source else (self._coming,):
            for d in digests:
                left = counts.get(d, 0) + n
                if left > 0:
                    counts[d] = left
                else:
                    counts.pop(d, None)

    # -- peers ----------------------------------------------------------------------------

    def _usable(self, peer_id: str) -> bool:
        until = self._bad_until.get(peer_id)
        if until is None:
            return True
        if until <= time.monotonic():
            del self._bad_until[peer_id]
            return True
        return False

    def _choose(self, candidates: Sequence[PeerRef], tried: set[str]) -> PeerRef | None:
        """The candidate to ask next: untried, not paused as bad; among those, the one this
        node is asking least right now and that did not refuse us (429) a moment ago —
        what the node knows first-hand, fresher than the supernode's heartbeat-old load.
        Ties keep the supernode's order (random among equals)."""
        now = time.monotonic()
        best: PeerRef | None = None
        best_key = (2, 0)
        for p in candidates:
            if p.id in tried or not self._usable(p.id):
                continue
            key = (1 if self._busy_until.get(p.id, 0.0) > now else 0,
                   self._asking.get(p.id, 0))
            if best is None or key < best_key:
                best, best_key = p, key
        return best

    async def _from_peers(self, todo: dict[str, ChunkWant], ranked: dict[str, list[PeerRef]],
                          out: dict[str, Outcome], t0: float, retry: set[str]) -> None:
        """Chunks of ``todo`` from their ranked candidates; ``retry`` collects those a
        candidate could not give *yet* (busy, or still fetching it): worth asking again."""
        cfg = self.config
        tried: dict[str, set[str]] = {d: set() for d in todo}

        def next_groups(digests: Iterable[str]) -> list[tuple[PeerRef, list[str]]]:
            groups: dict[str, tuple[PeerRef, list[str]]] = {}
            for d in digests:
                if d in out:
                    continue
                p = self._choose(ranked.get(d, ()), tried[d])
                if p is None:
                    continue
                tried[d].add(p.id)
                self._asking[p.id] = self._asking.get(p.id, 0) + 1  # counts while choosing
                groups.setdefault(p.id, (p, []))[1].append(d)
            batches = []
            for p, ds in groups.values():
                self._asking[p.id] -= len(ds)
                cur: list[str] = []
                size = 0
                for d in ds:  # at most cfg.batch chunks and about PEER_BATCH_BYTES each
                    n = todo[d].size
                    if cur and (len(cur) >= cfg.batch or size + n > PEER_BATCH_BYTES):
                        batches.append((p, cur))
                        cur, size = [], 0
                    cur.append(d)
                    size += n
                if cur:
                    batches.append((p, cur))
            return batches

        for _ in range(cfg.k):
            batches = next_groups(todo)
            if not batches:
                return
            tasks = {asyncio.create_task(self._peer_batch(p, ds, todo, out, t0, retry)): ds
                     for p, ds in batches}
            _, pending = await asyncio.wait(tasks, timeout=cfg.hedge_after)
            if pending:  # hedge: what slow peers still owe, also from the next candidates
                slow = [d for t in pending for d in tasks[t] if d not in out]
                for p, ds in next_groups(slow):
                    tasks[asyncio.create_task(self._peer_batch(p, ds, todo, out, t0,
                                                               retry))] = ds
                pending = {t for t in tasks if not t.done()}
                deadline = time.monotonic() + cfg.peer_timeout
                # Until every chunk arrived (from whichever copy) or every request ended.
                while pending and not all(d in out for d in todo):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    _, pending = await asyncio.wait(pending, timeout=left,
                                                    return_when=asyncio.FIRST_COMPLETED)
                for t in pending:  # the losers of a hedge (their chunks arrived elsewhere)
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            if all(d in out for d in todo):
                return

    def _mark_bad(self, peer: PeerRef, reason: str, digest: str | None) -> None:
        self._bad_until[peer.id] = time.monotonic() + BAD_PEER_PAUSE
        self.metrics.bad_peer_reports.labels(reason).inc()
        if self.tracker is not None:
            self.tracker.report(peer.id, reason, digest)

    async def _peer_batch(self, peer: PeerRef, digests: list[str], wants: dict[str, ChunkWant],
                          out: dict[str, Outcome], t0: float, retry: set[str],
                          mark: list[float] | None = None) -> None:
        """Ask ``peer`` for ``digests`` in one request; verified chunks land in ``out``.
        ``mark[0]``: set to the time each chunk arrives (progress, for the end game)."""
        got_any = False
        current: str | None = None
        arrival: Arrival | None = None  # the chunk being read, readable by peers meanwhile
        streaming = False  # reading the body of a frame sent while it arrives at the peer
        seen: set[str] = set()
        self._asking[peer.id] = self._asking.get(peer.id, 0) + len(digests)
        self._on_way(digests, 1)
        limit = self.config.peer_timeout
        try:
            # The timeout is on progress: it starts again with every chunk received, and
            # every PROGRESS_PIECE of a big one (``_read_body``). A busy peer whose uplink is
            # shared by many requests still delivers, only slowly; the end game's hedge deals
            # with it, and reporting it as timed out (and pausing it for BAD_PEER_PAUSE)
            # stranded the chunks only it had — and with links at 50 Mbit/s, three such
            # reports quarantined healthy peers, whose chunks were then fetched from the
            # source again (1.46x the image from the registry).
            async with asyncio.timeout(limit) as progress:
                async with self._http().post(f"{peer.address}/chunks",
                                             json={"digests": digests}) as resp:
                    if resp.status in (429, 503):
                        await resp.content.read(4096)  # the short answer: the connection
                        raise _Busy  # goes back to the pool (unread, aiohttp closes it)
                    if resp.status != 200:
                        log.info("peer %s answered HTTP %d", peer.id, resp.status)
                        return
                    for _ in digests:
                        try:
                            head = await resp.content.readexactly(chunkfile.FRAME_HEADER_SIZE)
                        except asyncio.IncompleteReadError as exc:
                            if not exc.partial:
                                return  # fewer frames than asked: the rest go elsewhere
                            raise IntegrityError("truncated frame header") from exc
                        raw, status, length = chunkfile.parse_frame_header(head)
                        d = raw.hex()
                        current = d
                        if d not in wants:
                            raise IntegrityError(f"peer sent chunk {d} that was not asked for")
                        found = status in (chunkfile.FRAME_FOUND, chunkfile.FRAME_ARRIVING)
                        if found and d not in out:
                            arrival = self._arrive(d, length)
                        streaming = status == chunkfile.FRAME_ARRIVING
                        body = await _read_body(resp.content, length, progress, limit, mark,
                                                arrival)
                        streaming = False
                        got_any = True
                        seen.add(d)
                        if not found:
                            retry.add(d)  # not there (yet): it may be on its way to that peer
                            continue
                        if arrival is None:  # the other copy of a hedge won: nothing to check
                            self.metrics.duplicate_bytes.inc(len(body))
                            continue
                        w = wants[d]
                        # This node's own work (verifying, storing: a thread, a disk) is not
                        # the peer's time: the progress timeout waits meanwhile. Counted, a
                        # backed-up disk made requesters report healthy peers as timed out.
                        progress.reschedule(None)
                        await self._verify(body, d, w.uncompressed_size)
                        if d in out:  # the other copy of a hedge won meanwhile
                            self.metrics.duplicate_bytes.inc(len(body))
                            self._gone(arrival, True)  # (its readers get the last piece)
                        else:
                            await self._accept(arrival, body, "peer", out, t0)
                        arrival = None
                        progress.reschedule(asyncio.get_running_loop().time() + limit)
                    # The end of the body (the chunked encoding's last chunk): read, the
                    # connection goes back to the pool; unread, aiohttp closes it, and a new
                    # TCP connection per request was ~5% of a busy peer's Python time. (More
                    # than was asked for: ignored, and the connection is not reused.)
                    await resp.content.read(1)
        except _Busy:
            self.metrics.peer_busy.inc()
            self._busy_until[peer.id] = time.monotonic() + BUSY_PAUSE
            retry.update(digests)
        except IntegrityError as exc:
            self.metrics.verification_failures.labels("peer").inc()
            log.warning("peer %s (%s) sent bad data: %s", peer.id, peer.address, exc)
            self._mark_bad(peer, "corrupt", current)
        except (asyncio.IncompleteReadError, TimeoutError, aiohttp.ClientError,
                OSError) as exc:
            if streaming:
                # The chunk failed, or stalled, on its way to the peer (its source or its own
                # upstream), which cut the connection: not the peer's fault. What it did not
                # send is asked again, of others first. Reporting it let a stalled registry
                # read get healthy nodes quarantined in the fan-out (1.03x the image then
                # came from the registry).
                log.info("peer %s: chunk %s cut off on its way there (%s)", peer.id,
                         (current or "?")[:12], type(exc).__name__)
                self.metrics.cut_through.labels("lost").inc()
                retry.update(d for d in digests if d not in seen)
            else:
                self._peer_failed(peer, exc, None if got_any else current, current,
                                  f"{len(seen)} of {len(digests)} chunks in")
        finally:
            if arrival is not None:  # cut off mid-chunk, or bad bytes: so are its readers
                self._gone(arrival)
            self._on_way(digests, -1)
            n = self._asking.get(peer.id, 0) - len(digests)
            if n > 0:
                self._asking[peer.id] = n
            else:
                self._asking.pop(peer.id, None)

    def _peer_failed(self, peer: PeerRef, exc: BaseException, blamed: str | None,
                     current: str | None, progress: str) -> None:
        """Report ``peer`` for a request that failed with ``exc`` (not a chunk cut off on its
        way to the peer): gone mid-body, silent for ``fetch.peer_timeout``, refused, broken."""
        if isinstance(exc, asyncio.IncompleteReadError):  # the peer went away mid-body
            self._mark_bad(peer, "error", current)
        elif isinstance(exc, TimeoutError):
            log.info("peer %s: nothing arrived for %g s (%s, reading %s)", peer.id,
                     self.config.peer_timeout, progress, (current or "none")[:12])
            self._mark_bad(peer, "timeout", None)
        elif isinstance(exc, aiohttp.ClientConnectorError):
            self._mark_bad(peer, "refused", None)
        else:
            log.info("peer %s failed: %s", peer.id, exc)
            self._mark_bad(peer, "error", blamed)

    async def _verify(self, body: bytes, digest: str, size: int) -> None:
        raw = bytes.fromhex(digest)
        if size and size <= INLINE_VERIFY:
            chunkfile.check_verified(body, raw, size or None)
        else:
            await asyncio.to_thread(chunkfile.check_verified, body, raw, size or None)

    async def _keep(self, digest: str, data: bytes) -> None:
        evicted = await self.store.put(digest, data)
        if evicted:
            self.metrics.evictions.inc(len(evicted))
        if self.tracker is not None:
            if evicted:
                self.tracker.withdraw(evicted)
            if digest in self.store:
                self.tracker.announce([digest])

    # -- source ---------------------------------------------------------------------------

    async def _from_source(self, todo: dict[str, ChunkWant], out: dict[str, Outcome],
                           t0: float, *, leased: bool = False) -> None:
        """``todo`` from its source locations; ``leased``: this node holds the supernode's
        source leases on them (counted as ``leased`` source fetches), renewed while their
        reads run (:meth:`_renew_leases`)."""
        by_source: dict[SourceLocation, list[ChunkWant]] = {}
        for d, w in todo.items():
            if w.source is None or not w.blob:
                out[d] = Outcome(d, error=FetchError(
                    f"chunk {d}: no peer has it and no source was given", code="not_found"))
                continue
            by_source.setdefault(w.source, []).append(w)
        jobs = []
        # Pieces of about SOURCE_PIECE bytes (neighbours in one merge into one GET), at most
        # SOURCE_LANES at a time, in blob order: the first chunks land (and can be served to
        # peers) after one piece, not when the whole fetch is in. One GET for a 4 MiB lease
        # took 5 s while sixteen shared the registry at the start of a fan-out, and every
        # other node waited for it.
        # A piece is bounded by bytes, not by a handful of chunks: the fan-out's image has
        # regions of thousands of files under a kilobyte, and pieces of 64 of those (64 KB
        # GETs, each taking a second or two on loaded links) left the registry link idle for
        # seconds while every node waited on its few source reads.
        lanes = asyncio.Semaphore(SOURCE_LANES)
        for loc, ws in by_source.items():
            ws.sort(key=lambda w: (w.blob, w.offset))
            piece: list[ChunkWant] = []
            size = 0
            for w in ws:
                if piece and (len(piece) >= SOURCE_PIECE_CHUNKS or size + w.size > SOURCE_PIECE):
                    jobs.append(self._source_batch(loc, piece, out, t0, lanes))
                    piece, size = [], 0
                piece.append(w)
                size += w.size
            if piece:
                jobs.append(self._source_batch(loc, piece, out, t0, lanes))
        self._sourcing += 1
        self._on_way(todo, 1, source=True)
        if leased:
            self.metrics.source_fetches.labels("leased").inc(len(todo))
            if self.tracker is not None:
                for d, w in todo.items():
                    self._leased_now[d] = w.size
                if self._renewer is None or self._renewer.done():
                    self._renewer = asyncio.create_task(self._renew_leases())
        try:
            await asyncio.gather(*jobs)
        finally:
            self._on_way(todo, -1, source=True)
            if leased:
                for d in todo:
                    self._leased_now.pop(d, None)
            self._sourcing -= 1
            # Leases this node held are released (announced): wake its refused requests.
            self._progress.set()
            self._progress = asyncio.Event()

    async def _renew_leases(self) -> None:
        """Keep this node's source leases alive while it fetches those chunks: every third
        of the supernode's ``leases.ttl``, a leases-only lookup (``expect`` false) of the
        chunks whose source reads have not ended renews them (a holder asking again is
        always granted). Stops when no leased fetch is left. A read that hangs ends by the
        source backend's own timeouts; its leases then lapse within ``leases.ttl``, and
        another node takes them over.

        Why: a lease used to last ``leases.ttl`` however long the fetch took. With the
        source link shared by many (8 nodes at 50 Mbit/s), the trace showed 1 MiB source
        pieces taking 4-9 s, so a node's 4 MiB of leases could outlive ``leases.ttl``; the
        supernode then leased those chunks to the next node that asked, and they crossed
        the source link twice."""
        tracker = self.tracker
        assert tracker is not None
        for _ in range(MAX_RENEWALS):
            ttl = tracker.lease_ttl or DEFAULT_LEASE_TTL
            await asyncio.sleep(ttl / 3)
            if not self._leased_now:
                break
            if not tracker.connected:
                continue
            digests = list(self._leased_now)
            log.debug("renewing %d leases", len(digests))
            for i in range(0, len(digests), BULK_LOOKUP):
                part = digests[i:i + BULK_LOOKUP]
                await tracker.lookup(part, {d: self._leased_now.get(d, 0) for d in part},
                                     expect=False)

    async def _source_batch(self, loc: SourceLocation, ws: list[ChunkWant],
                            out: dict[str, Outcome], t0: float,
                            lanes: asyncio.Semaphore) -> None:
        """One source piece: ``ws`` read from ``loc`` in one streamed call. Each chunk is
        readable by peers as it arrives (:meth:`_arrive`), and verified, stored and
        announced as soon as its last byte is in (:meth:`_land`), not when the whole piece
        is: in an image's regions of small files a piece holds hundreds of chunks."""
        def fail(code: str, msg: str) -> None:
            for w in ws:
                if w.digest not in out:
                    out[w.digest] = Outcome(w.digest, error=FetchError(
                        f"chunk {w.digest}: {msg}", code=code))

        try:
            backend = self.sources.backend(loc)
        except RequestError as exc:
            fail("bad_request", str(exc))
            return
        arrivals: list[Arrival | None] = [None] * len(ws)
        landing: list[asyncio.Task[None]] = []

        def sink(i: int, pos: int, data: bytes) -> None:
            a = arrivals[i]
            if a is None:  # (a chunk with a source has a payload: the local API says so)
                w = ws[i]
                a = arrivals[i] = self._arrive(w.digest, chunkfile.HEADER_SIZE + w.size)
                a.feed(0, chunkfile.header(w.size, w.flags, w.uncompressed_size,
                                           bytes.fromhex(w.digest)))
            if a.feed(chunkfile.HEADER_SIZE + pos, data):
                landing.append(asyncio.create_task(self._land(loc, ws[i], a, out, t0)))

        queued = time.monotonic()
        try:
            async with lanes, self._source_slots:
                began = time.monotonic()
                try:
                    await backend.stream_many(
                        [RangeRequest(w.blob, w.offset, w.size) for w in ws], sink)
                except NotFoundError as exc:
                    fail("not_found", f"{loc.describe()}: {exc}")
                except StorageError as exc:
                    fail("unavailable", f"{loc.describe()}: {exc}")
                finally:
                    for w in ws:
                        self._leased_now.pop(w.digest, None)
                log.debug("source piece of %d chunks (%s..., %d bytes): %.2f s, after %.2f s "
                          "queued", len(ws), ws[0].digest[:12], sum(w.size for w in ws),
                          time.monotonic() - began, began - queued)
            await asyncio.gather(*landing)
        finally:
            for task in landing:
                task.cancel()  # only when this was cancelled: they have ended otherwise
            for a in arrivals:
                if a is not None and a.ok is None:
                    self._gone(a)  # never arrived whole: peers reading it are cut off
        fail("unavailable", f"{loc.describe()}: the source sent less than asked")

    async def _land(self, loc: SourceLocation, w: ChunkWant, a: Arrival,
                    out: dict[str, Outcome], t0: float) -> None:
        """A chunk whose bytes are all in from the source: verify, store, announce."""
        d = w.digest
        data = a.whole()
        try:
            await self._verify(data, d, w.uncompressed_size)
        except (IntegrityError, ValueError) as exc:
            self._gone(a)
            self.metrics.verification_failures.labels("source").inc()
            out[d] = Outcome(d, error=FetchError(f"{loc.describe()}: {exc}", code="integrity"))
            return
        await self._accept(a, data, "source", out, t0)

    async def _accept(self, a: Arrival, data: bytes, origin: str, out: dict[str, Outcome],
                      t0: float) -> None:
        """``a``'s chunk file ``data``, verified: its readers get the last piece, and it is
        stored, announced and delivered (from ``origin``)."""
        a.finish(True)
        try:
            self.metrics.delivered(origin, len(data), time.monotonic() - t0)
            await self._keep(a.digest, data)
            self._settle(Outcome(a.digest, origin=origin, data=data), out)
        finally:
            self._gone(a, True)
