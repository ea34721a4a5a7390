"""The peer-store contract (``dfagent.supernode.peerstore.base``), run over every store.

Each test runs once per kind in ``conftest.STORE_KINDS`` (memory, and Redis on a real
redis-server); a new store joins by adding a kind there. Time is passed explicitly, as the
scheduler does, so nothing here sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from dfagent.errors import StoreUnavailable
from dfagent.supernode.model import PeerLoad
from dfagent.supernode.peerstore.base import PeerStore, ReportOutcome
from dfagent.supernode.peerstore.redis import RedisPeerStore

from .conftest import StoreFactory
from .helpers import digests, free_port, peer, run

T0 = 1_700_000_000.0
FAR = T0 - 1e6  # an alive_since no peer is older than


def check(factory: StoreFactory, body: Callable[[PeerStore], Awaitable[None]]) -> None:
    async def go() -> None:
        store = factory()
        await store.open()
        try:
            await body(store)
        finally:
            await store.close()

    run(go())


def test_register_get_and_replace(store_factory: StoreFactory) -> None:
    async def body(s: PeerStore) -> None:
        assert await s.get_peer("a") is None
        await s.register(peer("a", zone="z1", labels={"rack": "r7"}), now=T0, reset=False)
        found = await s.get_peer("a")
        assert found is not None
        state, chunks = found
        assert (state.info.address, state.info.zone, dict(state.info.labels), chunks) == \
            ("http://127.0.0.1:9000", "z1", {"rack": "r7"}, 0)
        assert (state.registered_at, state.last_seen, state.load) == (T0, T0, PeerLoad())
        # A re-registration replaces the record and keeps announcements unless reset.
        assert await s.announce("a", digests(3), alive_since=FAR) == 3
        await s.register(peer("a", zone="z2", port=9100), now=T0 + 5, reset=False)
        found = await s.get_peer("a")
        assert found is not None
        state, chunks = found
        assert (state.info.zone, state.info.address, state.last_seen, chunks) == \
            ("z2", "http://127.0.0.1:9100", T0 + 5, 3)
        await s.register(peer("a"), now=T0 + 6, reset=True)
        assert (await s.get_peer("a") or (None, -1))[1] == 0
        assert (await s.lookup(digests(3), reports_since=FAR)).holders == {}
        assert (await s.stats(now=T0)).entries == 0

    check(store_factory, body)


def test_heartbeat_updates_only_live_peers(store_factory: StoreFactory) -> None:
    async def body(s: PeerStore) -> None:
        assert not await s.heartbeat("ghost", PeerLoad(1, 2), now=T0, alive_since=FAR)
        assert await s.get_peer("ghost") is None
        await s.register(peer("a"), now=T0, reset=False)
        assert await s.heartbeat("a", PeerLoad(3, 4096), now=T0 + 10, alive_since=T0 - 30)
        state = (await s.get_peer("a") or (None, 0))[0]
        assert state is not None and (state.load, state.last_seen) == (PeerLoad(3, 4096), T0 + 10)
        # Expired (last seen before the cut-off) is treated like unknown: nothing changes.
        assert not await s.heartbeat("a", PeerLoad(5, 0), now=T0 + 50, alive_since=T0 + 11)
        state = (await s.get_peer("a") or (None, 0))[0]
        assert state is not None and (state.load, state.last_seen) == (PeerLoad(3, 4096), T0 + 10)

    check(store_factory, body)


def test_announce_withdraw_and_lookup(store_factory: StoreFactory) -> None:
    ds = digests(6)

    async def body(s: PeerStore) -> None:
        assert await s.announce("ghost", ds, alive_since=FAR) is None
        await s.register(peer("a"), now=T0, reset=False)
        await s.register(peer("b", port=9001), now=T0, reset=False)
        assert await s.announce("a", ds[:4], alive_since=FAR) == 4
        assert await s.announce("a", ds[2:5], alive_since=FAR) == 1  # 2 already held
        assert await s.announce("b", ds[3:], alive_since=FAR) == 3
        view = await s.lookup([ds[0], ds[3], ds[5], digests(1, 99)[0]], reports_since=FAR)
        assert {d: set(h) for d, h in view.holders.items()} == \
            {ds[0]: {"a"}, ds[3]: {"a", "b"}, ds[5]: {"b"}}
        assert {"a", "b"} <= set(view.peers)
        assert view.peers["b"].info.address == "http://127.0.0.1:9001"
        st = await s.stats(now=T0)
        assert (st.peers, st.chunks, st.entries) == (2, 6, 8)
        assert await s.withdraw("a", [ds[0], ds[3], digests(1, 99)[0]]) == 2
        assert await s.withdraw("ghost", ds) == 0
        view = await s.lookup(ds, reports_since=FAR)
        assert ds[0] not in view.holders
        assert set(view.holders[ds[3]]) == {"b"}
        st = await s.stats(now=T0)
        assert (st.chunks, st.entries) == (5, 6)
        # Announce to an expired peer: refused like an unknown one.
        assert await s.announce("a", digests(2, 50), alive_since=T0 + 1) is None

    check(store_factory, body)


def test_leave_removes_peer_and_chunks(store_factory: StoreFactory) -> None:
    ds = digests(4)

    async def body(s: PeerStore) -> None:
        await s.register(peer("a"), now=T0, reset=False)
        await s.register(peer("b"), now=T0, reset=False)
        await s.announce("a", ds, alive_since=FAR)
        await s.announce("b", ds[:1], alive_since=FAR)
        assert await s.leave("a")
        assert not await s.leave("a")
        assert await s.get_peer("a") is None
        view = await s.lookup(ds, reports_since=FAR)
        assert {d: set(h) for d, h in view.holders.items()} == {ds[0]: {"b"}}
        st = await s.stats(now=T0)
        assert (st.peers, st.chunks, st.entries) == (1, 1, 1)

    check(store_factory, body)


def test_expire_removes_only_stale_peers_once(store_factory: StoreFactory) -> None:
    ds = digests(5)

    async def body(s: PeerStore) -> None:
        for i, name in enumerate(["old1", "old2", "fresh"]):
            await s.register(peer(name), now=T0 + i * 10, reset=False)
            await s.announce(name, ds[i:i + 3], alive_since=FAR)
        # Two replicas sweeping at once: each stale peer is removed exactly once.
        a, b = await asyncio.gather(s.expire(T0 + 15), s.expire(T0 + 15))
        assert sorted(a + b) == ["old1", "old2"]
        assert await s.expire(T0 + 15) == []
        assert await s.get_peer("old1") is None
        assert await s.get_peer("fresh") is not None
        view = await s.lookup(ds, reports_since=FAR)
        assert {d: set(h) for d, h in view.holders.items()} == \
            {d: {"fresh"} for d in ds[2:5]}
        st = await s.stats(now=T0)
        assert (st.peers, st.chunks, st.entries) == (1, 3, 3)

    check(store_factory, body)


def test_expire_keeps_a_peer_that_heartbeated(store_factory: StoreFactory) -> None:
    async def body(s: PeerStore) -> None:
        await s.register(peer("a"), now=T0, reset=False)
        assert await s.heartbeat("a", PeerLoad(), now=T0 + 20, alive_since=T0 - 30)
        assert await s.expire(T0 + 10) == []
        assert await s.get_peer("a") is not None

    check(store_factory, body)


def test_reports_count_distinct_reporters_in_window(store_factory: StoreFactory) -> None:
    async def body(s: PeerStore) -> None:
        async def report(reporter: str, now: float, window_start: float) -> ReportOutcome:
            return await s.report("bad", reporter, now=now, window_start=window_start,
                                  threshold=3, quarantine_until=T0 + 1000)

        out = await report("r1", T0, T0 - 60)
        assert (out.reports, out.quarantined, out.newly_quarantined) == (1, False, False)
        out = await report("r1", T0 + 1, T0 - 59)
        assert out.reports == 1  # the same reporter counts once
        out = await report("r2", T0 + 2, T0 - 58)
        assert out.reports == 2
        view = await s.lookup(digests(1), reports_since=T0 - 58)
        assert view.holders == {}
        # r1's report at T0+1 falls out of the window: r3 makes 2, not 3.
        out = await report("r3", T0 + 100, T0 + 1.5)
        assert (out.reports, out.quarantined) == (2, False)
        assert await s.quarantined_until("bad") is None

    check(store_factory, body)


def test_threshold_quarantines_once_then_clears_reports(store_factory: StoreFactory) -> None:
    async def body(s: PeerStore) -> None:
        await s.register(peer("bad"), now=T0, reset=False)
        await s.announce("bad", digests(1), alive_since=FAR)
        outs = await asyncio.gather(*(
            s.report("bad", f"r{i}", now=T0, window_start=T0 - 60, threshold=3,
                     quarantine_until=T0 + 600) for i in range(6)))
        # Whatever order they arrive in: two below the threshold, the third quarantines, the
        # rest find it quarantined.
        assert sum(o.newly_quarantined for o in outs) == 1
        assert sum(o.quarantined for o in outs) == 4
        assert await s.quarantined_until("bad") == T0 + 600
        assert (await s.stats(now=T0)).quarantined == 1
        view = await s.lookup(digests(1), reports_since=T0 - 60)
        assert view.quarantined.get("bad") == T0 + 600
        assert "bad" not in view.reports  # cleared when quarantined
        # Quarantine outlives leaving and registering again.
        await s.leave("bad")
        await s.register(peer("bad"), now=T0 + 1, reset=True)
        assert await s.quarantined_until("bad") == T0 + 600
        # Ended quarantines are forgotten; then it takes fresh reports again.
        assert await s.expire_quarantines(T0 + 599) == 0
        assert (await s.stats(now=T0 + 601)).quarantined == 0
        assert await s.expire_quarantines(T0 + 601) == 1
        assert await s.quarantined_until("bad") is None
        out = await s.report("bad", "r0", now=T0 + 700, window_start=T0 + 640, threshold=3,
                             quarantine_until=T0 + 1300)
        assert (out.reports, out.quarantined) == (1, False)

    check(store_factory, body)


def test_lookup_reports_counts_since_cutoff(store_factory: StoreFactory) -> None:
    d = digests(1)

    async def body(s: PeerStore) -> None:
        for name in ("p", "r1", "r2"):
            await s.register(peer(name), now=T0, reset=False)
        await s.announce("p", d, alive_since=FAR)
        for i, r in enumerate(("r1", "r2")):
            await s.report("p", r, now=T0 + 10 * i, window_start=T0 - 60, threshold=5,
                           quarantine_until=T0 + 600)
        assert (await s.lookup(d, reports_since=T0 - 1)).reports == {"p": 2}
        assert (await s.lookup(d, reports_since=T0 + 5)).reports == {"p": 1}
        assert (await s.lookup(d, reports_since=T0 + 11)).reports == {}

    check(store_factory, body)


def test_many_peers_share_a_popular_chunk(store_factory: StoreFactory) -> None:
    ds = digests(50)

    async def body(s: PeerStore) -> None:
        for i in range(20):
            await s.register(peer(f"p{i}", port=9000 + i), now=T0, reset=False)
            assert await s.announce(f"p{i}", ds, alive_since=FAR) == 50
        view = await s.lookup(ds, reports_since=FAR)
        assert all(len(view.holders[d]) == 20 for d in ds)
        assert len(view.peers) >= 20
        st = await s.stats(now=T0)
        assert (st.peers, st.chunks, st.entries) == (20, 50, 1000)

    check(store_factory, body)


def test_lookup_gives_the_requester_zone(store_factory: StoreFactory) -> None:
    async def body(s: PeerStore) -> None:
        await s.register(peer("me", zone="z9"), now=T0, reset=False)
        assert (await s.lookup(digests(1), reports_since=FAR, requester="me")
                ).requester_zone == "z9"
        assert (await s.lookup(digests(1), reports_since=FAR, requester="nobody")
                ).requester_zone is None
        assert (await s.lookup(digests(1), reports_since=FAR)).requester_zone is None

    check(store_factory, body)


def test_numeric_looking_ids(store_factory: StoreFactory) -> None:
    """Peer ids like "1" and "2" stay strings (Redis's Lua JSON encoder must not turn a table
    keyed by them into an array)."""
    ds = digests(2)

    async def body(s: PeerStore) -> None:
        for name in ("1", "2"):
            await s.register(peer(name), now=T0, reset=False)
            await s.announce(name, ds, alive_since=FAR)
        view = await s.lookup(ds, reports_since=FAR)
        assert {d: sorted(h) for d, h in view.holders.items()} == {d: ["1", "2"] for d in ds}
        assert {"1", "2"} <= set(view.peers)

    check(store_factory, body)


def test_redis_down_is_store_unavailable() -> None:
    async def go() -> None:
        store = RedisPeerStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
        await store.open()
        try:
            assert not await store.ping()
            with pytest.raises(StoreUnavailable, match="redis"):
                await store.register(peer("a"), now=T0, reset=False)
            with pytest.raises(StoreUnavailable):
                await store.lookup(digests(3), reports_since=FAR)
        finally:
            await store.close()

    run(go())


def test_redis_password_never_in_errors() -> None:
    store = RedisPeerStore(f"redis://user:s3cret@127.0.0.1:{free_port()}/0", timeout=0.5)

    async def go() -> None:
        await store.open()
        try:
            with pytest.raises(StoreUnavailable) as info:
                await store.stats(now=T0)
            assert "s3cret" not in str(info.value)
        finally:
            await store.close()

    run(go())


def test_source_leases(store_factory: StoreFactory) -> None:
    async def body(s: PeerStore) -> None:
        d = digests(5)
        alive = T0 - 30
        for pid in ("a", "b"):
            await s.register(peer(pid), now=T0, reset=False)
        # a takes leases up to its limit, in request order; the rest are refused.
        got = await s.lease("a", d[:3], now=T0, until=T0 + 10, alive_since=alive, limit=2)
        assert (got.granted, got.others, got.live) == (d[:2], {}, True)
        # b is pointed at a for those, and gets the one a was refused.
        got = await s.lease("b", d[:3], now=T0 + 1, until=T0 + 11, alive_since=alive, limit=2)
        assert got.granted == [d[2]] and got.others == {d[0]: "a", d[1]: "a"}
        assert got.peers["a"].info.address == "http://127.0.0.1:9000"
        # Asking again renews one's own lease (and does not count it twice).
        got = await s.lease("a", [d[0], d[3]], now=T0 + 2, until=T0 + 12, alive_since=alive,
                            limit=2)
        assert got.granted == [d[0]]
        # Announcing the chunk ends the lease: a's slot is free again.
        await s.announce("a", [d[0]], alive_since=alive)
        got = await s.lease("a", [d[3]], now=T0 + 3, until=T0 + 13, alive_since=alive, limit=2)
        assert got.granted == [d[3]]
        # A lease past its end is free for anyone.
        got = await s.lease("b", [d[1]], now=T0 + 11, until=T0 + 21, alive_since=alive,
                            limit=5)
        assert got.granted == [d[1]]
        # A holder that stopped heartbeating does not block others, even before its lease ends.
        assert await s.heartbeat("b", PeerLoad(), now=T0 + 12, alive_since=alive)
        got = await s.lease("b", [d[3]], now=T0 + 12, until=T0 + 22, alive_since=T0 + 1,
                            limit=5)
        assert got.granted == [d[3]] and got.others == {}
        # An unknown or expired requester is granted nothing, and is told so.
        got = await s.lease("ghost", [d[4]], now=T0, until=T0 + 10, alive_since=alive, limit=5)
        assert (got.granted, got.live) == ([], False)
        # Leaving drops a peer's leases; the sweep forgets ended ones.
        assert await s.leave("b")
        got = await s.lease("a", d[1:4], now=T0 + 13, until=T0 + 23, alive_since=alive,
                            limit=5)
        assert got.granted == d[1:4]
        assert await s.expire_leases(T0 + 24) >= 3
        await s.register(peer("b"), now=T0 + 24, reset=False)
        got = await s.lease("b", d[1:4], now=T0 + 24, until=T0 + 34, alive_since=alive,
                            limit=5)
        assert got.granted == d[1:4]
        # A reset registration drops them too.
        await s.register(peer("b"), now=T0 + 25, reset=True)
        got = await s.lease("a", d[1:2], now=T0 + 25, until=T0 + 35, alive_since=alive,
                            limit=5)
        assert got.granted == d[1:2]

    check(store_factory, body)


def test_source_lease_byte_budget(store_factory: StoreFactory) -> None:
    """Leases are bounded by their chunks' source bytes too, whatever their number."""
    async def body(s: PeerStore) -> None:
        d = digests(8)
        alive = T0 - 30
        for pid in ("a", "b"):
            await s.register(peer(pid), now=T0, reset=False)

        async def lease(pid: str, ds: list[str], sizes: list[int], now: float) -> list[str]:
            got = await s.lease(pid, ds, now=now, until=now + 10, alive_since=alive,
                                limit=100, sizes=sizes, byte_limit=1000)
            return got.granted

        # Up to 1000 bytes in request order: 400 + 500 fit, 300 more does not, 100 does.
        assert await lease("a", d[:4], [400, 500, 300, 100], T0) == [d[0], d[1], d[3]]
        # Renewing one's own leases is always granted and not counted twice.
        assert await lease("a", [d[0], d[2]], [400, 300], T0 + 1) == [d[0]]
        # b has its own budget; a's leases point it at a.
        got = await s.lease("b", d[:3], now=T0 + 1, until=T0 + 11, alive_since=alive,
                            limit=100, sizes=[400, 500, 300], byte_limit=1000)
        assert got.granted == [d[2]] and got.others == {d[0]: "a", d[1]: "a"}
        # Announcing frees its bytes: 500 + 100 left held, so 300 fits again.
        await s.announce("a", [d[0]], alive_since=alive)
        assert await lease("a", [d[4]], [300], T0 + 2) == [d[4]]
        assert await lease("a", [d[5]], [200], T0 + 2) == []
        # A chunk bigger than the whole budget is leased when it is the only lease held.
        assert await lease("b", [d[6]], [5000], T0 + 3) == []
        await s.announce("b", [d[2]], alive_since=alive)
        assert await lease("b", [d[6], d[7]], [5000, 1], T0 + 3) == [d[6]]
        # Ended leases no longer count: after a's end, its budget is whole again.
        assert await lease("a", [d[5]], [900], T0 + 13) == [d[5]]
        # Without sizes only the count limit applies.
        got = await s.lease("b", d[:2], now=T0 + 14, until=T0 + 24, alive_since=alive,
                            limit=100, byte_limit=1000)
        assert got.granted == [d[0], d[1]]

    check(store_factory, body)


def test_expected_holders(store_factory: StoreFactory) -> None:
    async def body(s: PeerStore) -> None:
        d = digests(3)
        for pid in ("a", "b"):
            await s.register(peer(pid), now=T0, reset=False)
        await s.expect("a", d[:2], until=T0 + 10)
        await s.expect("ghost", d, until=T0 + 10)  # unknown peers are ignored
        view = await s.lookup(d, reports_since=FAR, now=T0 + 1)
        assert {k: sorted(v) for k, v in view.expected.items()} == {d[0]: ["a"], d[1]: ["a"]}
        assert "a" in view.peers and view.holders == {}
        assert (await s.lookup(d, reports_since=FAR)).expected == {}  # only when asked (now)
        assert (await s.lookup(d, reports_since=FAR, now=T0 + 10)).expected == {}  # ended
        # Announcing turns an expectation into a holder; leaving drops the rest.
        await s.announce("a", d[:1], alive_since=FAR)
        view = await s.lookup(d, reports_since=FAR, now=T0 + 1)
        assert set(view.expected) == {d[1]} and set(view.holders) == {d[0]}
        await s.expect("b", d[2:], until=T0 + 10)
        assert await s.leave("a")
        view = await s.lookup(d, reports_since=FAR, now=T0 + 1)
        assert {k: list(v) for k, v in view.expected.items()} == {d[2]: ["b"]}
        assert await s.expire_leases(T0 + 11) == 1
        assert (await s.lookup(d, reports_since=FAR, now=T0)).expected == {}

    check(store_factory, body)
