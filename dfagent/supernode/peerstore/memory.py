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
from dfagent.supernode.peerstore.base import (
    LeaseOutcome,
    LookupView,
    PeerStore,
    ReportOutcome,
    StoreStats,
)

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
        self._leases: dict[str, tuple[str, float]] = {}  # digest -> (holder, end)
        self._leased: dict[str, dict[str, float]] = {}  # holder -> digest -> end
        self._lease_size: dict[str, int] = {}  # digest -> source bytes of its lease
        self._expected: dict[str, dict[str, float]] = {}  # digest -> peer -> end
        self._expects: dict[str, set[str]] = {}  # peer -> digests it is expected to hold
        self._entries = 0

    # -- peers ---------------------------------------------------------------------------

    async def register(self, info: PeerInfo, *, now: float, reset: bool) -> None:
        old = self._peers.get(info.id)
        if old is not None:
            if reset:
                self._drop_chunks(old.id)
                self._drop_leases(old.id)
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
        self._drop_leases(state.id)
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
            self._drop_leases(pid)
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
        mine = self._leased.get(pid)
        if mine:
            for d in digests:
                if mine.pop(d, None) is not None:
                    del self._leases[d]
                    self._lease_size.pop(d, None)
        soon = self._expects.get(pid)
        if soon:
            for d in digests:
                if d in soon:
                    soon.discard(d)
                    self._unexpect(d, pid)
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
                     requester: str | None = None, now: float | None = None) -> LookupView:
        get = self._holders.get
        found: dict[str, _Holders] = {}
        for d in digests:
            holders = get(d)
            if holders is not None:
                found[d] = holders
        expected: dict[str, list[str]] = {}
        if now is not None and self._expected:
            for d in digests:
                who = self._expected.get(d)
                if who:
                    live = [pid for pid, end in who.items() if end > now]
                    if live:
                        expected[d] = live
        reports: dict[str, int] = {}
        for accused, by in self._reports.items():  # only peers someone complained about
            n = sum(1 for t in by.values() if t >= reports_since)
            if n:
                reports[accused] = n
        me = self._peers.get(requester) if requester is not None else None
        return LookupView(holders=found, peers=self._peers, quarantined=self._quarantine,
                          reports=reports, requester_zone=me.info.zone if me else None,
                          expected=expected)

    # -- source leases -------------------------------------------------------------------

    def _drop_leases(self, peer_id: str) -> None:
        for d in self._leased.pop(peer_id, {}):
            del self._leases[d]
            self._lease_size.pop(d, None)
        for d in self._expects.pop(peer_id, ()):
            self._unexpect(d, peer_id)

    def _unexpect(self, digest: str, peer_id: str) -> None:
        who = self._expected.get(digest)
        if who is not None:
            who.pop(peer_id, None)
            if not who:
                del self._expected[digest]

    async def expect(self, peer_id: str, digests: Sequence[str], *, until: float) -> None:
        state = self._peers.get(peer_id)
        if state is None:
            return
        pid = state.id
        soon = self._expects.setdefault(pid, set())
        for d in digests:
            self._expected.setdefault(d, {})[pid] = until
            soon.add(d)

    async def lease(self, peer_id: str, digests: Sequence[str], *, now: float, until: float,
                    alive_since: float, limit: int, sizes: Sequence[int] | None = None,
                    byte_limit: int = 0) -> LeaseOutcome:
        peers = self._peers
        me = peers.get(peer_id)
        live_me = me is not None and me.last_seen >= alive_since
        mine = self._leased.get(peer_id, {})
        held = 0
        held_bytes = 0
        lease_size = self._lease_size
        for ld, end in mine.items():
            if end > now:
                held += 1
                held_bytes += lease_size.get(ld, 0)
        granted: list[str] = []
        others: dict[str, str] = {}
        named: dict[str, PeerState] = {}
        for i, d in enumerate(digests):
            size = sizes[i] if sizes is not None and i < len(sizes) else 0
            cur = self._leases.get(d)
            if cur is not None:
                holder, end = cur
                if holder == peer_id:
                    if live_me:
                        if end <= now:
                            held += 1
                            held_bytes += lease_size.get(d, 0)
                        self._leases[d] = (holder, until)
                        mine[d] = until
                        granted.append(d)
                    continue
                st = peers.get(holder)
                if end > now and st is not None and st.last_seen >= alive_since:
                    others[d] = holder
                    named[holder] = st
                    continue
            if not live_me or held >= limit or (
                    byte_limit > 0 and held > 0 and held_bytes + size > byte_limit):
                continue
            if cur is not None:  # an ended lease, or its holder is gone: take it over
                self._leased.get(cur[0], {}).pop(d, None)
            assert me is not None
            self._leases[d] = (me.id, until)
            lease_size[d] = size
            mine[d] = until
            held += 1
            held_bytes += size
            granted.append(d)
        if mine and peer_id not in self._leased:
            self._leased[peer_id] = mine
        return LeaseOutcome(granted=granted, others=others, peers=named, live=live_me)

    async def expire_leases(self, now: float) -> int:
        gone = [(d, pid) for d, who in self._expected.items()
                for pid, end in who.items() if end < now]
        for d, pid in gone:
            self._unexpect(d, pid)
            soon = self._expects.get(pid)
            if soon is not None:
                soon.discard(d)
                if not soon:
                    del self._expects[pid]
        ended = [(d, holder) for d, (holder, end) in self._leases.items() if end < now]
        for d, holder in ended:
            del self._leases[d]
            self._lease_size.pop(d, None)
            mine = self._leased.get(holder)
            if mine is not None:
                mine.pop(d, None)
                if not mine:
                    del self._leased[holder]
        return len(ended) + len(gone)

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
