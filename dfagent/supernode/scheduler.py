"""The supernode's logic: the operations of the API over a peer store, with time and policy.

Service layer between the HTTP handlers (:mod:`dfagent.supernode.server`, which only parse and
format) and the state (:mod:`dfagent.supernode.peerstore`, which never reads a clock). The
scheduler owns the injected ``clock`` and ``rng`` and turns the config's TTLs into the cut-offs
the store compares against, so every time-dependent behaviour (expiry, quarantine, report
windows) is tested with a fake clock.

Errors: store failures propagate as :class:`~dfagent.errors.StoreUnavailable` /
:class:`~dfagent.errors.StoreError`; an unknown (or expired) peer is a ``False``/``None`` return,
which the HTTP layer turns into 404 ``unknown_peer``; a nonsensical request (a peer reporting
itself) is a :class:`~dfagent.errors.RequestError`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from dfagent.errors import RequestError
from dfagent.metrics import SupernodeMetrics
from dfagent.supernode.config import SupernodeConfig
from dfagent.supernode.model import PeerInfo, PeerLoad, PeerState
from dfagent.supernode.peerstore.base import PeerStore, StoreStats
from dfagent.supernode.ranking import rank

__all__ = ["Clock", "LookupAnswer", "PeerStatus", "ReportResult", "Scheduler"]

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class LookupAnswer:
    """Ranked peer ids per digest (digests nobody can serve are absent) and the info of every
    peer named. With leases asked for, of the digests nobody holds: ``leases`` those the
    requester now fetches from the source, ``fetching`` those another peer fetches (its id);
    any other was refused (the requester holds its limit of leases: ask again soon)."""

    chunks: dict[str, list[str]]
    peers: dict[str, PeerInfo]
    leases: list[str] = field(default_factory=list)
    fetching: dict[str, str] = field(default_factory=dict)
    requester_known: bool = True


@dataclass(frozen=True, slots=True)
class PeerStatus:
    state: PeerState
    chunks: int
    live: bool
    quarantined_until: float | None  # only when quarantined now


@dataclass(frozen=True, slots=True)
class ReportResult:
    counted: bool  # False: ignored (the reporter is quarantined, or the peer is unknown)
    reports: int  # distinct reporters within the window
    quarantined: bool


class Scheduler:
    """Register/heartbeat/leave, announce/withdraw, lookup, report and expiry over a store."""

    def __init__(self, store: PeerStore, config: SupernodeConfig, *,
                 clock: Clock = time.time, rng: random.Random | None = None,
                 metrics: SupernodeMetrics | None = None) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.metrics = metrics if metrics is not None else SupernodeMetrics()

    def _alive_since(self, now: float) -> float:
        return now - self.config.peer_ttl

    # -- peers ---------------------------------------------------------------------------

    async def register(self, info: PeerInfo, *, reset: bool = False) -> None:
        await self.store.register(info, now=self.clock(), reset=reset)
        self.metrics.registrations.inc()

    async def heartbeat(self, peer_id: str, load: PeerLoad) -> bool:
        """False: unknown or expired peer (it must register again)."""
        now = self.clock()
        return await self.store.heartbeat(peer_id, load, now=now,
                                          alive_since=self._alive_since(now))

    async def leave(self, peer_id: str) -> bool:
        return await self.store.leave(peer_id)

    async def peer(self, peer_id: str) -> PeerStatus | None:
        found = await self.store.get_peer(peer_id)
        if found is None:
            return None
        state, chunks = found
        now = self.clock()
        until = await self.store.quarantined_until(peer_id)
        return PeerStatus(state=state, chunks=chunks,
                          live=state.last_seen >= self._alive_since(now),
                          quarantined_until=until if until is not None and until > now else None)

    # -- chunks --------------------------------------------------------------------------

    async def announce(self, peer_id: str, digests: Sequence[str]) -> int | None:
        """New entries recorded; ``None``: unknown or expired peer."""
        added = await self.store.announce(peer_id, digests,
                                          alive_since=self._alive_since(self.clock()))
        if added is not None:
            self.metrics.announces.inc(len(digests))
        return added

    async def withdraw(self, peer_id: str, digests: Sequence[str]) -> int:
        removed = await self.store.withdraw(peer_id, digests)
        self.metrics.withdrawals.inc(len(digests))
        return removed

    async def lookup(self, digests: Sequence[str], *, requester: str | None = None,
                     zone: str | None = None, k: int | None = None,
                     lease: bool = False, sizes: Mapping[str, int] | None = None,
                     expect: bool = True) -> LookupAnswer:
        """Up to ``k`` ranked peers per digest (see :mod:`dfagent.supernode.ranking`).

        ``zone`` defaults to the requester's registered zone; ``k`` to the configured one.
        ``lease`` (needs ``requester``): for digests no eligible peer holds, take source
        leases (:meth:`PeerStore.lease`, at most ``leases.per_peer`` live ones and
        ``leases.bytes`` of source bytes per peer, ``sizes`` giving each digest's) so
        that one peer fetches each such chunk from its source and the others are pointed at
        it (``fetching``) instead of all fetching it too; and record the requester as
        expected to hold the chunks it will fetch from peers (:meth:`PeerStore.expect`), so
        later requesters are pointed at it as well — unless ``expect`` is false: a look-ahead
        for leases only, past what the requester will ask peers for now (recording it as
        expected there would point others at a peer that is not fetching those chunks).
        ``requester_known`` False in the answer:
        leases were asked for by a requester that is not registered or expired (it must
        register again; nothing was leased).
        """
        now = self.clock()
        window_start = now - self.config.quarantine.window
        view = await self.store.lookup(digests, reports_since=window_start,
                                       requester=requester if zone is None else None,
                                       now=now if lease else None)
        chunks = rank(view, digests, k=k or self.config.k, now=now,
                      alive_since=self._alive_since(now), rng=self.rng, requester=requester,
                      zone=zone if zone is not None else view.requester_zone)
        all_peers = view.peers

        def named() -> dict[str, PeerInfo]:
            return {pid: all_peers[pid].info for ids in chunks.values() for pid in ids}

        hits = len(chunks)
        self.metrics.lookup_hits.inc(hits)
        if hits < len(digests):
            self.metrics.lookup_misses.inc(len(digests) - hits)
        if not lease or requester is None:
            return LookupAnswer(chunks=chunks, peers=named())
        cfg = self.config.leases
        # A chunk nobody holds has no candidates even when peers are expected to hold it
        # (``rank``): they would all be waiting on whoever fetches it from the source, or on
        # each other if nobody does. So it is leased like any chunk nobody holds.
        if hits == len(digests):
            if expect:
                await self.store.expect(requester, list(chunks), until=now + cfg.ttl)
            return LookupAnswer(chunks=chunks, peers=named())
        missing = [d for d in digests if d not in chunks]
        got = await self.store.lease(requester, missing, now=now, until=now + cfg.ttl,
                                     alive_since=self._alive_since(now), limit=cfg.per_peer,
                                     sizes=[sizes.get(d, 0) for d in missing] if sizes else None,
                                     byte_limit=cfg.bytes)
        if not got.live:
            return LookupAnswer(chunks=chunks, peers=named(), requester_known=False)
        peers = named()
        # The requester will get these from peers: point the next requesters at it too.
        coming = [*chunks, *(d for d in got.others if d not in chunks)] if expect else []
        if coming:
            await self.store.expect(requester, coming, until=now + cfg.ttl)
        fetching: dict[str, str] = {}
        quarantined = view.quarantined
        for d, pid in got.others.items():
            if quarantined.get(pid, now) > now:
                continue  # a quarantined peer is never pointed at
            fetching[d] = pid
            if pid not in peers:
                peers[pid] = got.peers[pid].info
        m = self.metrics.leases
        m.labels("granted").inc(len(got.granted))
        m.labels("fetching").inc(len(fetching))
        m.labels("refused").inc(len(missing) - len(got.granted) - len(fetching))
        return LookupAnswer(chunks=chunks, peers=peers, leases=got.granted, fetching=fetching)

    # -- reports -------------------------------------------------------------------------

    async def report(self, peer_id: str, reporter: str, reason: str) -> ReportResult | None:
        """Count a bad-peer report; ``None``: the reporter is not a live registered peer."""
        if peer_id == reporter:
            raise RequestError("reporter: a peer cannot report itself")
        now = self.clock()
        found = await self.store.get_peer(reporter)
        if found is None or found[0].last_seen < self._alive_since(now):
            return None
        # A quarantined peer's word does not count (it could be accusing the honest ones), nor
        # does a report about a peer that is not registered (lookups never return it anyway).
        reporter_q = await self.store.quarantined_until(reporter)
        if (reporter_q is not None and reporter_q > now) or \
                await self.store.get_peer(peer_id) is None:
            self.metrics.reports.labels("ignored").inc()
            until = await self.store.quarantined_until(peer_id)
            return ReportResult(counted=False, reports=0,
                                quarantined=until is not None and until > now)
        q = self.config.quarantine
        out = await self.store.report(peer_id, reporter, now=now, window_start=now - q.window,
                                      threshold=q.reports, quarantine_until=now + q.duration)
        self.metrics.reports.labels("counted").inc()
        if out.newly_quarantined:
            self.metrics.quarantines.inc()
        return ReportResult(counted=True, reports=out.reports, quarantined=out.quarantined)

    # -- housekeeping --------------------------------------------------------------------

    async def sweep(self) -> list[str]:
        """Drop expired peers (and their chunks) and ended quarantines; the ids dropped."""
        now = self.clock()
        gone = await self.store.expire(self._alive_since(now))
        await self.store.expire_quarantines(now)
        await self.store.expire_leases(now)
        if gone:
            self.metrics.expirations.inc(len(gone))
        return gone

    async def stats(self) -> StoreStats:
        st = await self.store.stats(now=self.clock())
        self.metrics.set_store_stats(peers=st.peers, quarantined=st.quarantined,
                                     chunks=st.chunks, entries=st.entries)
        return st
