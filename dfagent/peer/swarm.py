"""The agent's side of the supernode conversation: registration, heartbeats, announcements.

:class:`Swarm` is the fetcher's :class:`~dfagent.peer.fetcher.Tracker`. One background task
(:meth:`Swarm.run`) keeps the peer registered:

* not registered → ``register``, then every chunk in the store is queued for announcement:
  this is both the start-up announcement of a rebuilt store and the re-announcement after a
  supernode lost its state. The first registration of the process has ``reset`` (the
  supernode forgets whatever it had for this id: a previous run's store); later ones do not,
  so a blip (a heartbeat that timed out on a loaded supernode) does not drop this peer's
  source leases and make others fetch what it is fetching; withdrawals queued meanwhile are
  still sent;
* registered → heartbeats (with load) every ``heartbeat_interval`` the supernode asked for,
  and queued announcements/withdrawals sent in batches as they come (a short debounce);
* ``UnknownPeer`` (the supernode restarted or expired us) or a heartbeat or announcement
  that no supernode answered → not registered: fetches skip lookups and go to the source at
  once, and the task retries registration every ``RETRY`` seconds until a supernode answers.

Lookups are bounded by ``fetch.lookup_timeout`` per supernode and never raise: a failure
counts in metrics and answers "no peers" (that fetch goes to the source). A lookup no
supernode answered does not by itself unregister the peer — one slow answer is not a dead
supernode — but it makes the next heartbeat go at once, which finds out. Reports are sent in
the background, best effort.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping

from dfagent.errors import SupernodeError, SupernodeUnavailable, UnknownPeer
from dfagent.metrics import PeerMetrics
from dfagent.peer.store import ChunkStore
from dfagent.supernode.client import LookupResult, SupernodeClient
from dfagent.supernode.model import PeerInfo, PeerLoad

__all__ = ["RETRY", "Swarm"]

log = logging.getLogger(__name__)

RETRY = 1.0  # seconds between registration attempts while no supernode answers
DEBOUNCE = 0.02  # seconds announcements are gathered before a batch is sent


class Swarm:
    """Registration, heartbeats, announce/withdraw queues and lookups (module docstring)."""

    def __init__(self, client: SupernodeClient, info: PeerInfo, store: ChunkStore,
                 metrics: PeerMetrics, *, lookup_timeout: float, k: int,
                 load: Callable[[], PeerLoad]) -> None:
        self.client = client
        self.info = info
        self.store = store
        self.metrics = metrics
        self.lookup_timeout = lookup_timeout
        self.k = k
        self._load = load
        self._connected = False
        self._announce: dict[str, None] = {}  # ordered set
        self._withdraw: dict[str, None] = {}
        self._wake = asyncio.Event()
        self._beat_now = False  # heartbeat at once (a lookup went unanswered)
        self._reports: set[asyncio.Task[None]] = set()
        self.registrations = 0
        self._lease_ttl: float | None = None  # the supernode's leases.ttl, once it said
        self.first_attempt = asyncio.Event()  # set once the first registration was tried

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def lease_ttl(self) -> float | None:
        return self._lease_ttl

    def _set_connected(self, value: bool) -> None:
        if value != self._connected:
            log.info("supernode %s", "registered" if value else "lost; fetching from sources")
        self._connected = value
        self.metrics.supernode_connected.set(1 if value else 0)

    # -- Tracker ----------------------------------------------------------------------------

    async def lookup(self, digests: list[str], sizes: Mapping[str, int] | None = None, *,
                     expect: bool = True) -> LookupResult | None:
        """Holders, and source leases for what nobody holds (``sizes``: their source sizes,
        for the supernode's byte budget of leases; ``expect`` False: leases only, docs/api.md);
        ``None`` when the supernode could not answer (the caller goes to the source)."""
        t0 = time.monotonic()
        try:
            found = await self.client.lookup_leased(digests, requester=self.info.id, k=self.k,
                                                    timeout=self.lookup_timeout, sizes=sizes,
                                                    expect=expect)
        except UnknownPeer as exc:
            self.metrics.lookup_errors.inc()
            log.info("lookup: %s; registering again", exc)
            self._set_connected(False)
            self._wake.set()
            return None
        except SupernodeUnavailable as exc:
            self.metrics.lookup_errors.inc()
            log.info("lookup failed, going to the source: %s", exc)
            self._beat_now = True  # is the supernode gone, or only slow? the heartbeat says
            self._wake.set()
            return None
        except SupernodeError as exc:
            self.metrics.lookup_errors.inc()
            log.warning("lookup refused: %s", exc)
            return None
        self.metrics.lookup_seconds.observe(time.monotonic() - t0)
        return found

    def announce(self, digests: Iterable[str]) -> None:
        for d in digests:
            self._withdraw.pop(d, None)
            self._announce[d] = None
        self._wake.set()

    def withdraw(self, digests: Iterable[str]) -> None:
        for d in digests:
            self._announce.pop(d, None)
            self._withdraw[d] = None
        self._wake.set()

    def report(self, peer_id: str, reason: str, digest: str | None) -> None:
        async def send() -> None:
            try:
                ack = await self.client.report(peer_id, reporter=self.info.id, reason=reason,
                                               digest=digest)
                log.info("reported peer %s (%s): %d report(s)%s", peer_id, reason, ack.reports,
                         ", quarantined" if ack.quarantined else "")
            except (SupernodeError, ValueError) as exc:
                log.info("could not report peer %s: %s", peer_id, exc)

        task = asyncio.get_running_loop().create_task(send())
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    # -- the background task --------------------------------------------------------------

    async def run(self) -> None:
        """Keep registered until cancelled (then :meth:`leave`)."""
        interval = RETRY
        next_beat = 0.0
        while True:
            if not self._connected:
                try:
                    reg = await self.client.register(self.info,
                                                     reset=self.registrations == 0)
                except SupernodeUnavailable as exc:
                    log.debug("no supernode: %s", exc)
                    self.first_attempt.set()
                    await self._sleep(RETRY)
                    continue
                except SupernodeError as exc:
                    log.error("supernode refused registration: %s", exc)
                    self.first_attempt.set()
                    await self._sleep(10 * RETRY)
                    continue
                self.registrations += 1
                self.metrics.registrations.inc()
                if reg.lease_ttl is not None and reg.lease_ttl > 0:
                    self._lease_ttl = reg.lease_ttl
                interval = max(0.05, reg.heartbeat_interval)
                next_beat = time.monotonic() + interval
                if self.registrations == 1:
                    self._withdraw.clear()  # reset: the supernode holds nothing for us
                self._announce = dict.fromkeys(self.store.digests())
                self._set_connected(True)
                self.first_attempt.set()
            await self._flush()
            if not self._connected:
                continue
            now = time.monotonic()
            if now >= next_beat or self._beat_now:
                self._beat_now = False
                try:
                    stats_load = self._load()
                    await self.client.heartbeat(self.info.id, stats_load)
                except UnknownPeer:
                    self._set_connected(False)
                    continue
                except SupernodeError as exc:
                    log.info("heartbeat failed: %s", exc)
                    self._set_connected(False)
                    continue
                next_beat = time.monotonic() + interval
            await self._sleep(max(0.0, next_beat - time.monotonic()))

    async def _sleep(self, seconds: float) -> None:
        """Until ``seconds`` pass or something is queued (then a short debounce)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
                await asyncio.sleep(DEBOUNCE)
        self._wake.clear()

    async def _flush(self) -> None:
        try:
            while self._withdraw:
                batch = list(self._withdraw)[:10_000]
                await self.client.withdraw(self.info.id, batch)
                for d in batch:
                    self._withdraw.pop(d, None)
            while self._announce:
                batch = list(self._announce)[:10_000]
                await self.client.announce(self.info.id, batch)
                for d in batch:
                    self._announce.pop(d, None)
        except SupernodeError as exc:
            log.info("announce/withdraw failed: %s", exc)
            self._set_connected(False)

    async def leave(self) -> None:
        """Tell the supernode we are going (best effort, bounded by the client's timeout)."""
        for task in list(self._reports):
            task.cancel()
        if self._connected:
            with contextlib.suppress(SupernodeError):
                await self.client.leave(self.info.id)
        self._set_connected(False)
