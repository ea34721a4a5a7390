"""The ranking policy (``dfagent.supernode.ranking``): eligibility, order, spreading.

Views are built directly (the policy is pure), with a seeded RNG so every run is the same.
"""

from __future__ import annotations

import random
from collections import Counter

from dfagent.supernode.model import PeerLoad, PeerState
from dfagent.supernode.peerstore.base import LookupView
from dfagent.supernode.ranking import rank

from .helpers import digest, peer

NOW = 1_700_000_000.0
TTL = 30.0
D = digest(0)


def state(name: str, *, zone: str = "", active: int = 0, capacity: int = 8,
          seen: float = NOW) -> PeerState:
    return PeerState(info=peer(name, zone=zone, capacity=capacity),
                     load=PeerLoad(active_uploads=active), registered_at=NOW - 100,
                     last_seen=seen)


def view(states: list[PeerState], *, holders: dict[str, list[str]] | None = None,
         quarantined: dict[str, float] | None = None,
         reports: dict[str, int] | None = None) -> LookupView:
    return LookupView(holders=holders or {D: [s.id for s in states]},
                      peers={s.id: s for s in states}, quarantined=quarantined or {},
                      reports=reports or {})


def ranked(v: LookupView, *, k: int = 8, seed: int = 1, requester: str | None = None,
           zone: str | None = None) -> list[str]:
    return rank(v, [D], k=k, now=NOW, alive_since=NOW - TTL, rng=random.Random(seed),
                requester=requester, zone=zone).get(D, [])


def test_never_requester_expired_quarantined_or_unregistered() -> None:
    v = view([state("ok"), state("me"), state("stale", seen=NOW - TTL - 1),
              state("jailed"), state("served-time")],
             holders={D: ["ok", "me", "stale", "jailed", "served-time", "left"]},
             quarantined={"jailed": NOW + 1, "served-time": NOW - 1})
    for seed in range(20):
        assert sorted(ranked(v, seed=seed, requester="me")) == ["ok", "served-time"]


def test_just_within_ttl_is_live() -> None:
    assert ranked(view([state("edge", seen=NOW - TTL)])) == ["edge"]


def test_no_eligible_holder_means_absent() -> None:
    v = view([state("me")])
    out = rank(v, [D, digest(1)], k=3, now=NOW, alive_since=NOW - TTL, rng=random.Random(0),
               requester="me")
    assert out == {}


def test_same_zone_first_then_reliability_then_load() -> None:
    states = [
        state("far-idle", zone="b"),
        state("near-busy", zone="a", active=7),
        state("near-idle", zone="a", active=0),
        state("near-reported", zone="a", active=0),
        state("near-full", zone="a", active=8),
    ]
    v = view(states, reports={"near-reported": 1})
    for seed in range(10):
        assert ranked(v, zone="a", seed=seed) == [
            "near-idle", "near-busy", "near-full", "near-reported", "far-idle"]


def test_requester_zone_empty_means_no_locality() -> None:
    v = view([state("x", zone="b", active=4), state("y", zone="a", active=0)])
    assert ranked(v, zone=None) == ["y", "x"]  # load decides, zones ignored
    assert ranked(v, zone="b") == ["x", "y"]


def test_load_is_banded_so_near_equals_share_first_place() -> None:
    # 2/8 and 3/8 are the same band (25-50 %); 4/8 is the next one.
    v = view([state("two", active=2), state("three", active=3), state("four", active=4)])
    firsts = Counter(ranked(v, seed=s)[0] for s in range(200))
    assert set(firsts) == {"two", "three"}
    assert all(ranked(v, seed=s)[2] == "four" for s in range(50))


def test_k_bounds_the_answer_and_takes_the_best() -> None:
    v = view([state(f"idle{i}") for i in range(5)] + [state(f"busy{i}", active=6)
                                                     for i in range(5)])
    for seed in range(20):
        got = ranked(v, k=3, seed=seed)
        assert len(got) == 3 and all(p.startswith("idle") for p in got)
    got = ranked(v, k=7)
    assert len(got) == 7 and set(got[:5]) == {f"idle{i}" for i in range(5)}


def test_random_choice_spreads_a_popular_chunk() -> None:
    n, lookups = 10, 10_000
    v = view([state(f"p{i}") for i in range(n)])
    rng = random.Random(42)
    firsts: Counter[str] = Counter()
    for _ in range(lookups):
        firsts[rank(v, [D], k=1, now=NOW, alive_since=NOW - TTL, rng=rng)[D][0]] += 1
    assert set(firsts) == {f"p{i}" for i in range(n)}
    # Uniform would be 1,000 each; a fixed order would give one peer all 10,000.
    assert max(firsts.values()) < 1_200 and min(firsts.values()) > 800


def test_batched_digests_rank_independently() -> None:
    a, b = state("a"), state("b", active=8)
    d1, d2, d3 = digest(1), digest(2), digest(3)
    v = LookupView(holders={d1: ["a", "b"], d2: ["b"], d3: ["a"]}, peers={"a": a, "b": b},
                   quarantined={}, reports={})
    out = rank(v, [d1, d2, d3, digest(4)], k=2, now=NOW, alive_since=NOW - TTL,
               rng=random.Random(0))
    assert out == {d1: ["a", "b"], d2: ["b"], d3: ["a"]}


def test_a_real_holder_is_always_among_expected_ones() -> None:
    """Peers only expected to hold a chunk may all be waiting for each other; a requester
    that only ever hears of them never gets it. The one holder that has it is named even
    when reports rank it below them, or when it loses the random draw."""
    expected = [f"soon{i}" for i in range(6)]
    states = [state("holder"), *(state(p) for p in expected)]
    for reports in ({"holder": 1}, {}):
        v = LookupView(holders={D: ["holder"]}, peers={s.id: s for s in states},
                       quarantined={}, reports=reports, expected={D: expected})
        seen_first: Counter[str] = Counter()
        for seed in range(30):
            got = ranked(v, k=4, seed=seed)
            assert len(got) == 4 and "holder" in got
            seen_first[got[0]] += 1
        if not reports:  # equals still share the requesters: the holder is not always first
            assert seen_first["holder"] < 30
    # A quarantined holder is not named, and then neither are the peers expected to get the
    # chunk (from whom?): the requester is leased it instead.
    v = LookupView(holders={D: ["holder"]}, peers={s.id: s for s in states},
                   quarantined={"holder": NOW + 60}, reports={}, expected={D: expected})
    assert ranked(v, k=4) == []


def test_expected_peers_are_named_only_once_someone_holds_the_chunk() -> None:
    """Before anyone holds a chunk, the peers expected to hold it are all waiting for the one
    fetching it from the source; a requester must be pointed there, not at them."""
    expected = ["soon1", "soon2"]
    states = [state("holder"), *(state(p) for p in expected)]
    nobody = LookupView(holders={}, peers={s.id: s for s in states}, quarantined={},
                        reports={}, expected={D: expected})
    assert ranked(nobody) == []
    held = LookupView(holders={D: ["holder"]}, peers={s.id: s for s in states},
                      quarantined={}, reports={}, expected={D: expected})
    assert sorted(ranked(held)) == ["holder", "soon1", "soon2"]
