"""The peer-store contract: who is registered, who holds which chunk, who is quarantined.

A store is *state*, not policy. It never reads a clock: every method that depends on time takes
the time (``now``) or a cut-off (``alive_since``, ``reports_since``) from the caller, the
:class:`~dfagent.supernode.scheduler.Scheduler`, which owns the injected clock and the TTLs.
That keeps expiry testable with a fake clock and makes the Redis store correct for several
supernode replicas: liveness is a timestamp written by whichever replica saw the heartbeat and
compared by whichever replica answers (replica clocks must agree to well within ``peer_ttl``;
NTP does that), never a Redis key TTL that one replica's view of time could not check.

Every implementation must pass ``tests/dfagent/supernode/test_peerstore.py``, which is run over
each one. Contract, errors included:

* Peer ids, digests and addresses reaching a store are already validated
  (:mod:`dfagent.supernode.model`); a store does not re-check them.
* A peer is *live* while ``last_seen >= alive_since``; methods given ``alive_since`` treat an
  expired-but-not-yet-swept peer exactly like an unknown one (``heartbeat`` and ``announce``
  return ``None``/``False``), so a peer that was away longer than its TTL must register again and
  re-announce: its old announcements may be stale.
* :meth:`PeerStore.lookup` returns raw candidates (holders may include expired or quarantined
  peers); filtering and ordering is the ranking policy's job (:mod:`dfagent.supernode.ranking`).
* Quarantine is keyed by peer id and outlives registration: leaving and registering again does
  not lift it.
* Source leases (:meth:`PeerStore.lease`) say which peer is fetching a chunk nobody holds
  from its source, so the others wait for it instead of fetching it too. A lease ends at its
  ``until``, when its holder announces that chunk, or when the holder leaves, is expired, or
  registers with ``reset``; a lease whose holder is not live counts as ended. A peer's leases
  are bounded in number and in bytes (the chunks' source sizes), so the chunks nobody holds
  spread over the peers that want them, whatever their sizes.
* All operations are idempotent, so a client may retry one on another replica after a timeout.
* Transient failures (Redis unreachable, timing out) raise
  :class:`~dfagent.errors.StoreUnavailable`; anything else unexpected from the backing service
  raises :class:`~dfagent.errors.StoreError`. Nothing else escapes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from dfagent.supernode.model import PeerInfo, PeerLoad, PeerState

__all__ = ["LeaseOutcome", "LookupView", "PeerStore", "ReportOutcome", "StoreStats"]


@dataclass(frozen=True, slots=True)
class LookupView:
    """Raw lookup candidates for a batch of digests.

    ``holders`` maps each requested digest that any peer announced to those peers' ids (absent:
    nobody has it). ``peers`` has the state of every holder that is registered (a holder missing
    here has left). ``quarantined`` maps peer ids to the time their quarantine ends (it may
    hold ids that are not holders, and ends in the past). ``reports`` maps holder ids to the
    number of distinct reporters since the given cut-off (absent: none). ``requester_zone`` is
    the zone the requester registered with (``None``: no requester given, or not registered).
    ``expected`` maps requested digests to peers expected to hold them soon
    (:meth:`PeerStore.expect`, still in force at the lookup's ``now``); ``peers`` describes
    them too.
    """

    holders: Mapping[str, Collection[str]]
    peers: Mapping[str, PeerState]
    quarantined: Mapping[str, float]
    reports: Mapping[str, int]
    requester_zone: str | None = None
    expected: Mapping[str, Collection[str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LeaseOutcome:
    """What :meth:`PeerStore.lease` did: ``granted`` the digests leased to the requester now
    (request order); ``others`` maps digests leased to another live peer to that peer's id;
    ``peers`` has the state of every peer named in ``others``. A digest in neither was refused
    (the requester holds its limit of leases). ``live``: the requester is registered and
    live (when not, nothing was granted)."""

    granted: list[str]
    others: dict[str, str]
    peers: dict[str, PeerState]
    live: bool = True


@dataclass(frozen=True, slots=True)
class ReportOutcome:
    """What a report did: ``reports`` distinct reporters inside the window (this one included);
    ``quarantined`` whether the peer is quarantined now; ``newly_quarantined`` whether this
    report is the one that put it there (exactly one report does, across all replicas)."""

    reports: int
    quarantined: bool
    newly_quarantined: bool


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Sizes, for metrics: registered peers (live or not yet swept), distinct digests with at
    least one holder, (peer, digest) entries, and peers quarantined now."""

    peers: int
    chunks: int
    entries: int
    quarantined: int


class PeerStore(ABC):
    """Where the supernode keeps its state. See the module docstring for the contract."""

    name: str = ""

    async def open(self) -> None:  # noqa: B027  (optional hook: most stores need no setup)
        """Connect (if remote). Raises :class:`StoreUnavailable` if the backing service is down."""

    async def close(self) -> None:  # noqa: B027
        """Release connections. Idempotent."""

    async def ping(self) -> bool:
        """True when the store can serve requests now (readiness)."""
        return True

    # -- peers ---------------------------------------------------------------------------

    @abstractmethod
    async def register(self, info: PeerInfo, *, now: float, reset: bool) -> None:
        """Add or replace a peer; it is live as of ``now`` with zero load.

        With ``reset`` its previous announcements and leases are forgotten (a restarted peer
        re-announces its whole store); without, they are kept (a re-registration after a
        network blip).
        """

    @abstractmethod
    async def heartbeat(self, peer_id: str, load: PeerLoad, *, now: float,
                        alive_since: float) -> bool:
        """Record the peer's load and that it is live at ``now``. False (and nothing changed)
        when the peer is unknown or expired (``last_seen < alive_since``)."""

    @abstractmethod
    async def leave(self, peer_id: str) -> bool:
        """Remove the peer, its announcements and leases; False if it was not registered."""

    @abstractmethod
    async def get_peer(self, peer_id: str) -> tuple[PeerState, int] | None:
        """The peer's state and the number of digests it holds; ``None`` if not registered
        (expired peers are returned until swept: the caller compares ``last_seen``)."""

    @abstractmethod
    async def expire(self, alive_since: float) -> list[str]:
        """Remove every peer with ``last_seen < alive_since``, its announcements and leases;
        return their ids. Safe to run concurrently on several replicas: each peer is removed once,
        and a peer whose heartbeat arrived meanwhile is kept."""

    # -- chunks --------------------------------------------------------------------------

    @abstractmethod
    async def announce(self, peer_id: str, digests: Sequence[str], *,
                       alive_since: float) -> int | None:
        """Record that the live peer holds ``digests`` (ending its leases on them); return how
        many were new for it. ``None`` (nothing recorded) when the peer is unknown or
        expired."""

    @abstractmethod
    async def withdraw(self, peer_id: str, digests: Sequence[str]) -> int:
        """Forget that the peer holds ``digests``; return how many it held. Unknown peers and
        digests are ignored (0)."""

    @abstractmethod
    async def lookup(self, digests: Sequence[str], *, reports_since: float,
                     requester: str | None = None, now: float | None = None) -> LookupView:
        """Raw candidates for ``digests`` (see :class:`LookupView`), and the zone of
        ``requester`` if given (one round trip for both, on remote stores). With ``now``,
        also the peers expected to hold them (expectations ending after ``now``)."""

    # -- source leases -------------------------------------------------------------------

    @abstractmethod
    async def lease(self, peer_id: str, digests: Sequence[str], *, now: float, until: float,
                    alive_since: float, limit: int, sizes: Sequence[int] | None = None,
                    byte_limit: int = 0) -> LeaseOutcome:
        """Source leases for ``digests`` (which the caller found nobody holds), atomically.

        For each digest in order: a lease that ends after ``now`` held by another peer that is
        live (registered, ``last_seen >= alive_since``) goes to ``others``; one already held by
        ``peer_id`` is renewed to ``until`` and granted; otherwise a new one until ``until`` is
        granted (taking over an ended lease or one whose holder is not live) while ``peer_id``
        holds fewer than ``limit`` live leases and, with ``byte_limit`` > 0, while the sizes of
        its live leases plus this chunk's are at most ``byte_limit`` — or it holds none (so a
        chunk larger than the budget is still leased, alone). ``sizes`` are the digests'
        source sizes in bytes, in order (``None`` or missing: 0, counted only by ``limit``).
        The rest are refused. An unknown or expired ``peer_id`` is granted nothing
        (``others`` is still filled in).
        """

    @abstractmethod
    async def expect(self, peer_id: str, digests: Sequence[str], *, until: float) -> None:
        """Record that ``peer_id`` is fetching ``digests`` from other peers and will hold them
        soon: until ``until`` (or until it announces one, leaves, expires or registers with
        ``reset``), lookups that pass ``now`` name it as a candidate too, so the next
        requesters can get the chunk from it instead of all from the first holder."""

    @abstractmethod
    async def expire_leases(self, now: float) -> int:
        """Forget leases and expectations that ended before ``now``; return how many."""

    # -- reports -------------------------------------------------------------------------

    @abstractmethod
    async def report(self, peer_id: str, reporter: str, *, now: float, window_start: float,
                     threshold: int, quarantine_until: float) -> ReportOutcome:
        """Record that ``reporter`` found ``peer_id`` bad at ``now``, atomically.

        Reports older than ``window_start`` are forgotten; a reporter counts once (its latest
        report). When the distinct reporters reach ``threshold``, the peer is quarantined until
        ``quarantine_until`` and its reports are cleared, so after the quarantine it takes
        fresh reports to quarantine it again. A report about a peer already quarantined at
        ``now`` changes nothing.
        """

    @abstractmethod
    async def quarantined_until(self, peer_id: str) -> float | None:
        """When the peer's (latest) quarantine ends, or ``None`` if it never was quarantined
        (or that was forgotten by :meth:`expire_quarantines`)."""

    @abstractmethod
    async def expire_quarantines(self, now: float) -> int:
        """Forget quarantines that ended before ``now``; return how many."""

    # -- sizes ---------------------------------------------------------------------------

    @abstractmethod
    async def stats(self, *, now: float) -> StoreStats:
        """Current sizes (see :class:`StoreStats`); ``now`` decides who is quarantined."""
