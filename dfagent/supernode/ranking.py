"""The peer ranking policy: which holders of a chunk a requester should try, in which order.

Pure policy over a :class:`~dfagent.supernode.peerstore.base.LookupView`: no I/O, no clock (the
caller passes ``now``), no global randomness (the caller passes the RNG, so tests are
deterministic). A holder is *eligible* unless it

* is the requester itself,
* is not registered any more, or is expired (``last_seen < alive_since``), or
* is quarantined at ``now``.

Eligible holders are ordered by a *tier*, most significant first:

1. locality: same zone as the requester first (no preference when the requester has no zone);
2. reliability: fewer distinct recent bad-peer reports first (reported peers are tried last
   even before they reach the quarantine threshold);
3. load: ``active_uploads / capacity`` in :data:`LOAD_BUCKETS` bands (below 25 %, 50 %, 75 %,
   100 %), saturated peers last (they answer 429 quickly, so they stay in the list).

Load is banded rather than compared exactly because the figure is a heartbeat old: a peer at
3/8 and one at 2/8 are equally good choices, and treating them as equals is what lets the
random choice spread a popular chunk's requesters over all its holders instead of sending
everyone to whichever peer happened to report one upload less. Within a tier the order is
random; at most ``k`` peers are returned per digest.

Peers *expected* to hold a chunk soon (``view.expected``: they are fetching it from a peer
and serve it once they have it) are candidates like holders, in the same tiers: a chunk many
peers want at once then spreads as a tree (each new copy serves the next requesters) instead
of every requester queueing at its first holder. They are named only for a chunk that some
peer holds: before anyone has it, every expected peer is waiting for the one fetching it from
the source, and a requester pointed at them waited on a chain of peers instead of asking that
one (the scheduler points it there: ``fetching``); the fan-out benchmark finished about a
second and a half later. And one holder that has the chunk is always among the ``k``, ranked
or not (with no eligible holder, none of them is named): a reported holder ranks below the
expected peers, which may be waiting for each other, and a requester that only ever heard of
them never got the chunk.

Cost: each distinct holder's tier is computed once per call, then one dict probe per
(digest, holder); batched lookups amortise the per-request work.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from dfagent.supernode.peerstore.base import LookupView

__all__ = ["LOAD_BUCKETS", "rank"]

LOAD_BUCKETS = 4
_INELIGIBLE = -1
_ZONE_SHIFT = 16
_REPORTS_SHIFT = 8
_MAX_REPORTS = 255


def rank(view: LookupView, digests: Iterable[str], *, k: int, now: float,
         alive_since: float, rng: random.Random, requester: str | None = None,
         zone: str | None = None) -> dict[str, list[str]]:
    """Up to ``k`` ranked peer ids for each of ``digests`` that has an eligible holder.

    Digests with no eligible holder are absent from the result. ``zone`` is the requester's
    zone (``None`` or ``""``: no locality preference).
    """
    peers = view.peers
    quarantined = view.quarantined
    reports = view.reports
    tiers: dict[str, int] = {}

    def tier_of(pid: str) -> int:
        st = peers.get(pid)
        if (st is None or pid == requester or st.last_seen < alive_since
                or quarantined.get(pid, now) > now):
            return _INELIGIBLE
        info = st.info
        tier = 0
        if zone and info.zone != zone:
            tier = 1 << _ZONE_SHIFT
        n = reports.get(pid)
        if n:
            tier |= min(n, _MAX_REPORTS) << _REPORTS_SHIFT
        active = st.load.active_uploads
        cap = info.capacity
        tier |= LOAD_BUCKETS if active >= cap else active * LOAD_BUCKETS // cap
        return tier

    out: dict[str, list[str]] = {}
    all_holders = view.holders
    expected = view.expected
    for d in digests:
        holders = real = all_holders.get(d)
        if expected and real:  # expected peers of a chunk nobody holds: not named (above)
            soon = expected.get(d)
            if soon:
                holders = list(dict.fromkeys([*(holders or ()), *soon]))
        if not holders:
            continue
        if real and holders is not real:
            out_d = _rank_one(holders, tiers, tier_of, k, rng)
            if out_d and not any(pid in real for pid in out_d):
                # A real holder always among them: the expected ones may all be waiting for
                # each other. With no eligible holder (quarantined, expired) none is named.
                best = _rank_one(list(real), tiers, tier_of, 1, rng)
                out_d = [*out_d[:k - 1], *best] if best else []
            if out_d:
                out[d] = out_d
            continue
        chosen = _rank_one(holders, tiers, tier_of, k, rng)
        if chosen:
            out[d] = chosen
    return out


def _rank_one(holders: Iterable[str], tiers: dict[str, int], tier_of: Callable[[str], int],
              k: int, rng: random.Random) -> list[str]:
    """Up to ``k`` of ``holders``, eligible ones only, best tier first, random within one."""
    groups: dict[int, list[str]] = {}
    for pid in holders:
        t = tiers.get(pid)
        if t is None:
            t = tiers[pid] = tier_of(pid)
        if t != _INELIGIBLE:
            group = groups.get(t)
            if group is None:
                groups[t] = [pid]
            else:
                group.append(pid)
    if not groups:
        return []
    if len(groups) == 1:  # the common case: all holders equally good
        (group,) = groups.values()
        return _pick(group, k, rng)
    chosen: list[str] = []
    for t in sorted(groups):
        chosen += _pick(groups[t], k - len(chosen), rng)
        if len(chosen) >= k:
            break
    return chosen


def _pick(group: list[str], n: int, rng: random.Random) -> list[str]:
    """``n`` members of ``group`` in random order (all of them, shuffled, if fewer)."""
    if len(group) <= n:
        if len(group) > 1:
            rng.shuffle(group)
        return group
    return rng.sample(group, n)
