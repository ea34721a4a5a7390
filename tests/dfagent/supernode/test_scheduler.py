"""Expiry, quarantine and lookup through the :class:`Scheduler`, with a fake clock.

Runs over every store kind (memory and a real Redis). Nothing sleeps: the clock moves only
when a test calls ``advance``.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest

from dfagent.errors import RequestError
from dfagent.supernode.config import LeaseConfig, QuarantineConfig, SupernodeConfig
from dfagent.supernode.model import PeerLoad
from dfagent.supernode.scheduler import Scheduler

from .conftest import StoreFactory
from .helpers import FakeClock, digests, peer, run

CONFIG = SupernodeConfig(peer_ttl=30.0, k=4,
                         quarantine=QuarantineConfig(reports=3, window=60.0, duration=600.0))


def check(factory: StoreFactory,
          body: Callable[[Scheduler, FakeClock], Awaitable[None]]) -> None:
    async def go() -> None:
        clock = FakeClock()
        store = factory()
        await store.open()
        try:
            await body(Scheduler(store, CONFIG, clock=clock, rng=random.Random(7)), clock)
        finally:
            await store.close()

    run(go())


def test_missed_heartbeats_expire_peer_and_chunks(store_factory: StoreFactory) -> None:
    ds = digests(3)

    async def body(s: Scheduler, clock: FakeClock) -> None:
        await s.register(peer("a"))
        await s.register(peer("b"))
        await s.announce("a", ds)
        await s.announce("b", ds)
        for _ in range(4):  # b heartbeats every 20 s; a never does
            clock.advance(20)
            assert await s.heartbeat("b", PeerLoad(1, 10))
        # a expired 50 s ago: lookups skip it even before the sweep removes it.
        answer = await s.lookup(ds)
        assert answer.chunks == {d: ["b"] for d in ds}
        assert set(answer.peers) == {"b"}
        assert not await s.heartbeat("a", PeerLoad())  # must register again
        assert await s.announce("a", ds) is None
        status = await s.peer("a")
        assert status is not None and not status.live
        assert await s.sweep() == ["a"]
        assert await s.peer("a") is None
        st = await s.stats()
        assert (st.peers, st.entries) == (1, 3)
        # Registering again brings it back.
        await s.register(peer("a"), reset=True)
        assert await s.announce("a", ds[:1]) == 1
        assert sorted((await s.lookup(ds[:1])).chunks[ds[0]]) == ["a", "b"]

    check(store_factory, body)


def test_exactly_at_ttl_still_live(store_factory: StoreFactory) -> None:
    async def body(s: Scheduler, clock: FakeClock) -> None:
        await s.register(peer("a"))
        await s.announce("a", digests(1))
        clock.advance(30)
        assert await s.sweep() == []
        assert (await s.lookup(digests(1))).chunks
        clock.advance(0.001)
        assert not (await s.lookup(digests(1))).chunks
        assert await s.sweep() == ["a"]

    check(store_factory, body)


def test_distinct_reporters_quarantine_then_release(store_factory: StoreFactory) -> None:
    d = digests(1)

    async def body(s: Scheduler, clock: FakeClock) -> None:
        for name in ("bad", "good", "r1", "r2", "r3"):
            await s.register(peer(name))
        await s.announce("bad", d)
        await s.announce("good", d)
        # One reporter repeating itself is one report, however often.
        for _ in range(5):
            out = await s.report("bad", "r1", "corrupt")
            assert out is not None and (out.counted, out.reports, out.quarantined) == \
                (True, 1, False)
        # The reported peer is still returned, but after the unreported one.
        for _ in range(5):
            assert (await s.lookup(d, requester="r3")).chunks[d[0]] == ["good", "bad"]
        out = await s.report("bad", "r2", "timeout")
        assert out is not None and (out.reports, out.quarantined) == (2, False)
        out = await s.report("bad", "r3", "corrupt")
        assert out is not None and out.quarantined
        assert s.metrics.quarantines._value.get() == 1
        assert (await s.lookup(d)).chunks[d[0]] == ["good"]
        status = await s.peer("bad")
        assert status is not None and status.quarantined_until == clock() + 600
        # Heartbeats keep it registered, but it stays out until the quarantine ends.
        for step in [20.0] * 29 + [19.0, 2.0]:  # 599 s, then 601 s
            clock.advance(step)
            assert await s.heartbeat("bad", PeerLoad())
            assert await s.heartbeat("good", PeerLoad())
            if step == 19.0:
                assert (await s.lookup(d)).chunks[d[0]] == ["good"]
        assert sorted((await s.lookup(d)).chunks[d[0]]) == ["bad", "good"]
        await s.sweep()
        assert (await s.peer("bad") or pytest.fail("gone")).quarantined_until is None

    check(store_factory, body)


def test_reports_spread_beyond_the_window_do_not_quarantine(
        store_factory: StoreFactory) -> None:
    async def body(s: Scheduler, clock: FakeClock) -> None:
        for name in ("bad", "r1", "r2", "r3"):
            await s.register(peer(name))
        for r in ("r1", "r2", "r3"):
            out = await s.report("bad", r, "timeout")
            assert out is not None and not out.quarantined and out.reports <= 2
            for _ in range(2):  # 31 s apart: the first is out of the 60 s window at the third
                clock.advance(15.5)
                for name in ("bad", "r1", "r2", "r3"):
                    assert await s.heartbeat(name, PeerLoad())
        assert (await s.peer("bad") or pytest.fail("gone")).quarantined_until is None

    check(store_factory, body)


def test_who_may_report(store_factory: StoreFactory) -> None:
    async def body(s: Scheduler, clock: FakeClock) -> None:
        for name in ("bad", "r1", "r2", "r3", "liar"):
            await s.register(peer(name))
        with pytest.raises(RequestError, match="itself"):
            await s.report("bad", "bad", "corrupt")
        assert await s.report("bad", "stranger", "corrupt") is None  # not registered
        out = await s.report("ghost", "r1", "corrupt")  # not a registered peer: ignored
        assert out is not None and not out.counted
        # Quarantine "liar"; then its reports do not count.
        for r in ("r1", "r2", "r3"):
            await s.report("liar", r, "corrupt")
        for _ in range(3):
            out = await s.report("bad", "liar", "corrupt")
            assert out is not None and not out.counted
        assert (await s.peer("bad") or pytest.fail("gone")).quarantined_until is None
        # An expired reporter cannot report either.
        clock.advance(31)
        await s.heartbeat("bad", PeerLoad())
        assert await s.report("bad", "r1", "corrupt") is None

    check(store_factory, body)


def test_lookup_uses_requester_zone_and_k(store_factory: StoreFactory) -> None:
    d = digests(1)

    async def body(s: Scheduler, clock: FakeClock) -> None:
        await s.register(peer("me", zone="a"))
        for i in range(6):
            await s.register(peer(f"far{i}", zone="b"))
            await s.announce(f"far{i}", d)
        await s.register(peer("near", zone="a"))
        await s.announce("near", d)
        await s.announce("me", d)
        for _ in range(5):
            got = (await s.lookup(d, requester="me")).chunks[d[0]]
            assert len(got) == 4 and got[0] == "near" and "me" not in got
        got = (await s.lookup(d, requester="me", zone="b", k=2)).chunks[d[0]]
        assert len(got) == 2 and all(p.startswith("far") for p in got)
        answer = await s.lookup(d + digests(2, 10))
        assert list(answer.chunks) == d  # digests nobody holds are absent
        assert s.metrics.lookups.labels("miss")._value.get() == 2

    check(store_factory, body)


def test_default_leases_cover_a_region_of_tiny_chunks(store_factory: StoreFactory) -> None:
    """With the default lease limits a peer asking for 1,000 chunks of 500 bytes (500 KB, far
    under ``leases.bytes``) gets them all: the count limit is a bound on state, not what
    spreads source fetches. At 256 it kept each node's source reads to a few hundred KB in
    the tiny-file regions of an image, and the registry link idle."""
    ds = digests(1000)

    async def body(s: Scheduler, clock: FakeClock) -> None:
        s.config = SupernodeConfig(peer_ttl=60.0)  # default leases
        await s.register(peer("a"))
        got = await s.lookup(ds, requester="a", lease=True, sizes=dict.fromkeys(ds, 500),
                             expect=False)
        assert sorted(got.leases) == sorted(ds)

    check(store_factory, body)


def test_a_look_ahead_for_leases_records_no_expectation(store_factory: StoreFactory) -> None:
    """``expect=False`` (the agent's look-ahead) takes leases but does not make the supernode
    name the requester for chunks it was pointed at peers for: it is not fetching those."""
    ds = digests(2)
    config = SupernodeConfig(peer_ttl=60.0, leases=LeaseConfig(ttl=5.0, per_peer=8))

    async def body(s: Scheduler, clock: FakeClock) -> None:
        s.config = config
        for pid in ("x", "a", "b"):
            await s.register(peer(pid))
        await s.announce("x", ds[:1])
        ahead = await s.lookup(ds, requester="a", lease=True, expect=False)
        assert ahead.chunks == {ds[0]: ["x"]} and ahead.leases == [ds[1]]
        later = await s.lookup(ds[:1], requester="b", lease=True)
        assert later.chunks == {ds[0]: ["x"]}  # a is not named: it did not ask x for it
        await s.lookup(ds[:1], requester="a", lease=True)  # now it does
        named = await s.lookup(ds[:1], requester="b", lease=True)
        assert sorted(named.chunks[ds[0]]) == ["a", "x"]

    check(store_factory, body)


def test_a_chunk_only_expected_and_not_leased_is_leased_again(
        store_factory: StoreFactory) -> None:
    """Peers expected to hold a chunk whose lease ended without it (the leaseholder never
    fetched it) wait on each other for ever unless someone is given the lease: the next
    requester is, and is not pointed at them."""
    ds = digests(2)
    config = SupernodeConfig(peer_ttl=60.0, leases=LeaseConfig(ttl=5.0, per_peer=8))

    async def body(s: Scheduler, clock: FakeClock) -> None:
        s.config = config
        for pid in ("a", "b", "c", "d"):
            await s.register(peer(pid))
        assert (await s.lookup(ds, requester="a", lease=True)).leases == ds
        # b and c are pointed at a and expected to hold both soon; a holds ds[0] now.
        for pid in ("b", "c"):
            assert set((await s.lookup(ds, requester=pid, lease=True)).fetching) == set(ds)
        await s.announce("a", [ds[0]])
        clock.advance(3)
        for pid in ("b", "c"):  # asking again renews their expectation, not a's lease
            await s.lookup(ds, requester=pid, lease=True)
        clock.advance(3)  # a's lease on ds[1] ended; b and c are still expected to hold it
        for pid in ("a", "b", "c", "d"):
            await s.heartbeat(pid, PeerLoad())
        got = await s.lookup(ds, requester="d", lease=True)
        assert got.leases == [ds[1]] and ds[1] not in got.chunks
        assert "a" in got.chunks[ds[0]]  # a real holder: pointed at as before
        # The next requester is pointed at d, which fetches it.
        again = await s.lookup(ds[1:], requester="b", lease=True)
        assert again.fetching == {ds[1]: "d"} and again.leases == []

    check(store_factory, body)


def test_source_leases_point_others_at_the_fetcher_and_expire(
        store_factory: StoreFactory) -> None:
    ds = digests(3)
    config = SupernodeConfig(peer_ttl=30.0, leases=LeaseConfig(ttl=5.0, per_peer=2))

    async def body(s: Scheduler, clock: FakeClock) -> None:
        s.config = config
        for pid in ("a", "b", "c"):
            await s.register(peer(pid))
        first = await s.lookup(ds, requester="a", lease=True)
        assert first and first.leases == ds[:2] and first.chunks == {}
        # A second requester of an in-flight chunk is pointed at the peer fetching it.
        second = await s.lookup(ds, requester="b", lease=True)
        assert second.fetching == {ds[0]: "a", ds[1]: "a"} and second.leases == [ds[2]]
        assert second.peers["a"].address == "http://127.0.0.1:9000"
        # a got ds[0]: announcing it ends the lease. c is pointed at the holder and at b,
        # which will have it soon (so copies spread as a tree, not all from a). Nobody holds
        # ds[1] yet: c is pointed at a, which fetches it, not at b, which waits for a.
        await s.announce("a", [ds[0]])
        third = await s.lookup(ds[:2], requester="c", lease=True)
        assert {d: sorted(ps) for d, ps in third.chunks.items()} == {ds[0]: ["a", "b"]}
        assert third.fetching == {ds[1]: "a"} and third.leases == []
        # Leases expire quickly: a's unfinished one passes to the next requester.
        clock.advance(6)
        later = await s.lookup(ds[1:2], requester="c", lease=True)
        assert later and later.leases == [ds[1]]
        # A holder that dies (no heartbeats) stops blocking others even before its lease ends.
        s.config = replace(config, leases=LeaseConfig(ttl=600.0, per_peer=2))
        held = await s.lookup(ds[2:], requester="c", lease=True)
        assert held and held.leases == [ds[2]]
        clock.advance(20)
        assert await s.heartbeat("b", PeerLoad())
        blocked = await s.lookup(ds[2:], requester="b", lease=True)
        assert blocked and blocked.fetching == {ds[2]: "c"}
        clock.advance(11)  # c last seen 31 s ago: expired (peer_ttl 30), not yet swept
        got = await s.lookup(ds[2:], requester="b", lease=True)
        assert got and got.leases == [ds[2]] and got.fetching == {}
        # Without lease, or from a requester the supernode does not know: no leases.
        plain = await s.lookup(ds[2:], requester="a")
        assert plain and plain.leases == [] and plain.fetching == {}
        ghost = await s.lookup(digests(1, start=9), requester="ghost", lease=True)
        assert not ghost.requester_known and ghost.leases == []

    check(store_factory, body)
