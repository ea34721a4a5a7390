"""The in-memory peer store: the default, embedded in one supernode process.

Built for the lookup path (goal: 20,000+ digest lookups per second per core, see
docs/benchmarks.md). The index is two dicts of sets, kept in step:

* ``digest -> set of peer ids`` (the holders; what a lookup reads: one dict probe per digest);
* ``peer id -> set of digests`` (what a peer holds; what leave, reset and expiry walk).

Memory per (peer, chunk) entry is one slot in each set. The digest string is stored once and
shared by every peer's set (the holder set remembers its canonical digest object), and peer ids
are the registered record's own string, so an announce never keeps a second copy of either.

The state is lost when the process exits; peers notice (``unknown_peer`` on their next
heartbeat) and register and announce again. Use the Redis store to share state between
replicas or to survive restarts.

Nothing here awaits: each operation runs to completion on the event loop, so the live
structures handed out in a :class:`~dfagent.supernode.peerstore.base.LookupView` are consistent
until the caller's next ``await``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from dfagent.supernode.model import PeerInfo, PeerLoad, PeerState
from dfagent.supernode.peerstore.base import LookupView, PeerStore, ReportOutcome, StoreStats

__all__ = ["MemoryPeerStore"]

_ZERO_LOAD = PeerLoad()


class _Holders(set[str]):
    """The peer ids holding one digest; ``digest`` is the canonical digest string, so every
    peer's held-set references this one object instead of its own copy."""

    __slots__ = ("digest",)

    def __init__(self, digest: str) -> None:
        super().__init__()
        self.digest = digest


class MemoryPeerStore(PeerStore):
    """All state in process memory. See :mod:`dfagent.supernode.peerstore.base` for the
    contract."""

    name = "memory"

    def __init__(self) -> None:
        self._peers: dict[str, PeerState] = {}
        self._holders: dict[str, _Holders] = {}
        self._held: dict[str, set[str]] = {}
        self._reports: dict[str, dict[str, float]] = {}  # accused -> reporter -> time
        self._quarantine: dict[str, float] = {}  # peer -> end of its quarantine
        self._entries = 0

    # -- peers ---------------------------------------------------------------------------

    async def register(self, info: PeerInfo, *, now: float, reset: bool) -> None:
        old = self._peers.get(info.id)
        if old is not None:
            if reset:
                self._drop_chunks(old.id)
            # Keep the first id object: the holder sets reference it (one string per peer).
            info = replace(info, id=old.id)
        self._peers[info.id] = PeerState(info=info, load=_ZERO_LOAD, registered_at=now,
                                         last_seen=now)

    async def heartbeat(self, peer_id: str, load: PeerLoad, *, now: float,
                        alive_since: float) -> bool:
        state = self._peers.get(peer_id)
        if state is None or state.last_seen < alive_since:
            return False
        state.load = load
        state.last_seen = now
        return True

    async def leave(self, peer_id: str) -> bool:
        state = self._peers.pop(peer_id, None)
        if state is None:
            return False
        self._drop_chunks(state.id)
        return True

    async def get_peer(self, peer_id: str) -> tuple[PeerState, int] | None:
        state = self._peers.get(peer_id)
        if state is None:
            return None
        return state, len(self._held.get(peer_id, ()))

    async def expire(self, alive_since: float) -> list[str]:
        gone = [pid for pid, s in self._peers.items() if s.last_seen < alive_since]
        for pid in gone:
            del self._peers[pid]
            self._drop_chunks(pid)
        for accused in [a for a in self._reports if a not in self._peers]:
            del self._reports[accused]  # reports about peers that are gone only cost memory
        return gone

    def _drop_chunks(self, peer_id: str) -> None:
        held = self._held.pop(peer_id, None)
        if not held:
            return
        holders_of = self._holders
        for d in held:
            holders = holders_of[d]
            holders.discard(peer_id)
            if not holders:
                del holders_of[d]
        self._entries -= len(held)

    # -- chunks --------------------------------------------------------------------------

    async def announce(self, peer_id: str, digests: Sequence[str], *,
                       alive_since: float) -> int | None:
        state = self._peers.get(peer_id)
        if state is None or state.last_seen < alive_since:
            return None
        pid = state.id  # the registered object, shared by every holder set
        held = self._held.get(pid)
        if held is None:
            held = self._held[pid] = set()
        holders_of = self._holders
        added = 0
        for d in digests:
            holders = holders_of.get(d)
            if holders is None:
                holders = holders_of[d] = _Holders(d)
            elif pid in holders:
                continue
            holders.add(pid)
            held.add(holders.digest)
            added += 1
        self._entries += added
        return added

    async def withdraw(self, peer_id: str, digests: Sequence[str]) -> int:
        held = self._held.get(peer_id)
        if not held:
            return 0
        holders_of = self._holders
        removed = 0
        for d in digests:
            if d not in held:
                continue
            held.discard(d)
            holders = holders_of[d]
            holders.discard(peer_id)
            if not holders:
                del holders_of[d]
            removed += 1
        self._entries -= removed
        return removed

    async def lookup(self, digests: Sequence[str], *, reports_since: float,
                     requester: str | None = None) -> LookupView:
        get = self._holders.get
        found: dict[str, _Holders] = {}
        for d in digests:
            holders = get(d)
            if holders is not None:
                found[d] = holders
        reports: dict[str, int] = {}
        for accused, by in self._reports.items():  # only peers someone complained about
            n = sum(1 for t in by.values() if t >= reports_since)
            if n:
                reports[accused] = n
        me = self._peers.get(requester) if requester is not None else None
        return LookupView(holders=found, peers=self._peers, quarantined=self._quarantine,
                          reports=reports, requester_zone=me.info.zone if me else None)

    # -- reports -------------------------------------------------------------------------

    async def report(self, peer_id: str, reporter: str, *, now: float, window_start: float,
                     threshold: int, quarantine_until: float) -> ReportOutcome:
        if self._quarantine.get(peer_id, float("-inf")) > now:
            return ReportOutcome(reports=0, quarantined=True, newly_quarantined=False)
        by = self._reports.setdefault(peer_id, {})
        for r in [r for r, t in by.items() if t < window_start]:
            del by[r]
        by[reporter] = now
        n = len(by)
        if n >= threshold:
            self._quarantine[peer_id] = quarantine_until
            del self._reports[peer_id]
            return ReportOutcome(reports=n, quarantined=True, newly_quarantined=True)
        return ReportOutcome(reports=n, quarantined=False, newly_quarantined=False)

    async def quarantined_until(self, peer_id: str) -> float | None:
        return self._quarantine.get(peer_id)

    async def expire_quarantines(self, now: float) -> int:
        ended = [p for p, until in self._quarantine.items() if until < now]
        for p in ended:
            del self._quarantine[p]
        return len(ended)

    # -- sizes ---------------------------------------------------------------------------

    async def stats(self, *, now: float) -> StoreStats:
        return StoreStats(
            peers=len(self._peers),
            chunks=len(self._holders),
            entries=self._entries,
            quarantined=sum(1 for until in self._quarantine.values() if until > now),
        )
