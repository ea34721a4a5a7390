"""The fetch path in one process, real sockets: single flight, a frozen supernode, hedging.

Agents are real (``start_peer``: upload server on loopback TCP, local API on a Unix socket);
the supernode is the real server (``start_supernode``). A "frozen" supernode is a socket that
accepts connections and never answers, as a stopped process does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dfagent.peer import fetcher, upload
from dfagent.peer.agent import RunningPeer
from dfagent.peer.config import FetchConfig, UploadConfig
from dfagent.peer.fetcher import ChunkWant
from dfagent.supernode.client import PeerRef
from dfagent.supernode.config import LeaseConfig, SupernodeConfig
from dfagent.supernode.model import PeerInfo
from dfagent.supernode.server import start_supernode
from nydusfs.config import HostPort
from nydusfs.format import chunkfile

from .helpers import chunk, run, seeded, start_node, wants_of


def test_single_flight_and_a_frozen_supernode(tmp_path: Path) -> None:
    """Five requesters of the same chunks, one source read each; a supernode that accepts
    connections and never answers stalls neither a fetch nor a bulk fetch."""
    async def go() -> None:
        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(3600)

        frozen = await asyncio.start_server(mute, "127.0.0.1", 0)
        port = frozen.sockets[0].getsockname()[1]
        peer = await start_node(tmp_path, "a", [f"http://127.0.0.1:{port}"],
                           fetch=FetchConfig(lookup_timeout=0.2))
        try:
            assert peer.swarm is not None and not peer.swarm.connected
            wants = wants_of(tmp_path, [chunk(50_000) for _ in range(8)])
            results = await asyncio.gather(*(peer.fetcher.get_many(wants) for _ in range(5)))
            for outcomes in results:
                assert [o.digest for o in outcomes] == [w.digest for w in wants]
                assert all(o.error is None for o in outcomes)
            # five requesters, one read of each chunk from the source
            assert peer.metrics.delivered_by["source"] == len(wants)
            (stats,) = peer.sources.stats().values()
            assert stats["bytes"] == sum(w.size for w in wants)
            assert peer.metrics.delivered_by["peer"] == 0
            # A bulk fetch (a whole-image prefetch) does not wait on it either.
            more = wants_of(tmp_path, [chunk(10_000) for _ in range(6)])
            got = await asyncio.wait_for(peer.fetcher.get_many(more, bulk=True), 30)
            assert all(o.origin == "source" and o.error is None for o in got)
            assert peer.metrics.delivered_by["source"] == len(wants) + len(more)
        finally:
            await peer.close()
            frozen.close()

    run(go())


def test_slow_peer_is_hedged_and_bad_source_data_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        sn = await start_supernode(SupernodeConfig(listen=HostPort("127.0.0.1", 0)))
        urls = [sn.url]
        fetch = FetchConfig(lookup_timeout=5.0, hedge_after=0.3, peer_timeout=60.0)
        # Same zone as the requester: the supernode ranks the slow peer first, every time.
        slow = await start_node(tmp_path, "slow", urls, upload=UploadConfig(rate=16 << 10),
                           zone="z1")
        fast = await start_node(tmp_path, "fast", urls, zone="z2")
        req = await start_node(tmp_path, "req", urls, fetch=fetch, zone="z1")
        try:
            big = chunk(400_000)  # 25 s from the slow peer alone
            wants = wants_of(tmp_path, [big])
            await seeded(sn, wants, slow, fast)
            # Strip the source: only peers can serve now.
            (tmp_path / "blobs" / wants[0].blob).unlink()
            (o,) = await asyncio.wait_for(req.fetcher.get_many(wants), 20)
            assert o.origin == "peer" and o.error is None  # the hedge to fast won

            # A source whose bytes do not match the digest: refused, never stored.
            liar = chunk(1000)
            (w,) = wants_of(tmp_path / "liar", [liar])
            blob = tmp_path / "liar" / "blobs" / w.blob
            blob.write_bytes(b"\x00" * blob.stat().st_size)
            (o,) = await req.fetcher.get_many([w])
            assert o.error is not None and o.error.code == "integrity"
            assert liar.digest not in req.store
        finally:
            for p in (req, fast, slow):
                await p.close()
            await sn.close()

    run(go())


def test_requests_spread_by_what_this_node_knows(tmp_path: Path) -> None:
    """Candidates are picked by this node's own in-flight requests and recent 429s (fresher
    than the supernode's heartbeat-old load), the supernode's order breaking ties."""
    from dfagent.metrics import PeerMetrics
    from dfagent.peer.config import SourceConfig
    from dfagent.peer.fetcher import Fetcher
    from dfagent.peer.source import SourcePool
    from dfagent.peer.store import ChunkStore
    from dfagent.supernode.client import PeerRef

    f = Fetcher(ChunkStore(tmp_path / "s", 1 << 20), SourcePool(SourceConfig()), PeerMetrics(),
                FetchConfig())
    a, b, c = (PeerRef(id=x, address=f"http://127.0.0.1:{i}", zone="") for i, x in
               enumerate("abc", 9000))
    assert f._choose([a, b, c], set()) is a  # nothing known: the supernode's order
    f._asking.update({"a": 2, "b": 1})
    assert f._choose([a, b, c], set()) is c  # the one this node asks least
    f._asking["c"] = 3
    assert f._choose([a, b, c], set()) is b
    f._busy_until["b"] = time.monotonic() + 60  # b refused us a moment ago
    assert f._choose([a, b, c], set()) is a
    assert f._choose([a, b, c], {"a", "c"}) is b  # busy ones still beat nothing
    f._bad_until["b"] = time.monotonic() + 60
    assert f._choose([a, b, c], {"a", "c"}) is None  # bad ones are skipped


def test_requests_to_a_peer_are_bounded_in_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks asked of one peer go in requests of about ``PEER_BATCH_BYTES`` (and at most
    ``fetch.batch`` chunks), so one request's time on a shared link does not grow with the
    chunk size; every chunk still arrives, verified, from the peer."""
    monkeypatch.setattr(fetcher, "PEER_BATCH_BYTES", 100_000)
    sent: list[list[str]] = []
    real = fetcher.Fetcher._peer_batch

    async def recording(self: fetcher.Fetcher, peer: PeerRef, digests: list[str],
                        *args: Any) -> None:
        sent.append(list(digests))
        await real(self, peer, digests, *args)

    monkeypatch.setattr(fetcher.Fetcher, "_peer_batch", recording)

    async def go() -> None:
        sn = await start_supernode(SupernodeConfig(listen=HostPort("127.0.0.1", 0)))
        holder = await start_node(tmp_path, "holder", [sn.url])
        req = await start_node(tmp_path, "req", [sn.url], fetch=FetchConfig(batch=16))
        try:
            wants = wants_of(tmp_path, [chunk(40_000) for _ in range(6)] +
                           [chunk(1000) for _ in range(20)])
            assert all(o.origin == "source" for o in await holder.fetcher.get_many(wants))
            for _ in range(500):  # bounded: all announced
                view = await sn.scheduler.lookup([w.digest for w in wants], k=4)
                if len(view.chunks) == len(wants):
                    break
                await asyncio.sleep(0.02)
            (tmp_path / "blobs" / wants[0].blob).unlink()  # only the peer can serve now
            got = await asyncio.wait_for(req.fetcher.get_many(wants), 20)
            assert all(o.origin == "peer" and o.error is None for o in got)
            sizes = {w.digest: w.size for w in wants}
            assert sorted(d for ds in sent for d in ds) == sorted(sizes)  # each asked once
            for ds in sent:
                assert len(ds) <= 16
                assert len(ds) == 1 or sum(sizes[d] for d in ds) <= 100_000
            assert len(sent) >= 4  # 6 x 40 kB: two per request; 20 small ones: 16 per request
        finally:
            for p in (req, holder):
                await p.close()
            await sn.close()

    run(go())


def test_a_full_lease_budget_makes_chunks_wait_for_their_lease(tmp_path: Path) -> None:
    """Lookups carry the chunks' sizes; with a lease budget of one chunk's bytes the node is
    refused the others at first, waits while its own source fetch runs, and fetches every
    chunk under a lease (none unarranged)."""
    from dfagent.supernode.config import LeaseConfig

    async def go() -> None:
        sn = await start_supernode(SupernodeConfig(
            listen=HostPort("127.0.0.1", 0), leases=LeaseConfig(bytes=30_000)))
        node = await start_node(tmp_path, "n", [sn.url], fetch=FetchConfig(lease_wait=2.0))
        try:
            wants = wants_of(tmp_path, [chunk(20_000) for _ in range(5)])
            got = await asyncio.wait_for(node.fetcher.get_many(wants), 30)
            assert all(o.origin == "source" and o.error is None for o in got)
            m = node.metrics.source_fetches
            assert m.labels("leased")._value.get() == 5
            for reason in ("refused", "waited", "direct", "failed"):
                assert m.labels(reason)._value.get() == 0, reason
            leases = sn.scheduler.metrics.leases
            assert leases.labels("granted")._value.get() == 5
            assert leases.labels("refused")._value.get() >= 4  # the budget held them back
        finally:
            await node.close()
            await sn.close()

    run(go())


def test_bulk_fetches_share_an_image_through_leases(tmp_path: Path) -> None:
    """Three nodes bulk-fetch the same chunks at once (a whole-image prefetch on each): every
    chunk comes from the source exactly once in all (the supernode's leases spread it), the
    rest from peers, each node ends with every chunk, verified, and none waited it out."""

    async def go() -> None:
        sn = await start_supernode(SupernodeConfig(listen=HostPort("127.0.0.1", 0)))
        nodes = [await start_node(tmp_path, name, [sn.url], fetch=FetchConfig(lookup_timeout=5.0))
                 for name in ("a", "b", "c")]
        try:
            wants = wants_of(tmp_path, [chunk(30_000) for _ in range(40)])
            results = await asyncio.wait_for(asyncio.gather(
                *(n.fetcher.get_many(wants, bulk=True) for n in nodes)), 60)
            for node, outcomes in zip(nodes, results, strict=True):
                assert [o.digest for o in outcomes] == [w.digest for w in wants]
                assert all(o.error is None for o in outcomes)
                assert all(w.digest in node.store for w in wants)
            by_origin = {origin: sum(n.metrics.delivered_by[origin] for n in nodes)
                         for origin in ("source", "peer")}
            assert by_origin["source"] == len(wants)  # each chunk crossed the source once
            assert by_origin["peer"] == 2 * len(wants)
            source_bytes = sum(s["bytes"] for n in nodes for s in n.sources.stats().values())
            assert source_bytes == sum(w.size for w in wants)
            for n in nodes:
                m = n.metrics.source_fetches
                for reason in ("waited", "failed", "direct", "refused"):
                    assert m.labels(reason)._value.get() == 0, (n.config.id, reason)
                assert n.fetcher._bulk_bytes == 0  # the window is given back
        finally:
            for n in nodes:
                await n.close()
            await sn.close()

    run(go())


@pytest.mark.parametrize(("rate", "sizes", "peer_timeout"), [
    # 16 KiB/s after a burst of two seconds' worth: a chunk about every 1.25 s, all four in
    # about 3 s, in one request (progress per chunk).
    (16 << 10, [20_000] * 4, 2.0),
    # One 1 MB chunk at 128 KiB/s: about 6 s, and no chunk completes before the timeout
    # (progress per PROGRESS_PIECE of it).
    (128 << 10, [1_000_000], 3.0),
], ids=["small-chunks", "one-big-chunk"])
def test_a_slow_but_moving_peer_is_not_timed_out(tmp_path: Path, rate: int, sizes: list[int],
                                                 peer_timeout: float) -> None:
    """``fetch.peer_timeout`` is on progress, in bytes: a request that keeps bringing chunks,
    or bytes of one big chunk, slowly, runs past it and is not reported. It was, and its peer
    was paused for 30 s; at 50 Mbit/s such reports quarantined healthy peers, and everything
    they held was fetched from the registry again."""
    async def go() -> None:
        sn = await start_supernode(SupernodeConfig(listen=HostPort("127.0.0.1", 0)))
        slow = await start_node(tmp_path, "slow", [sn.url], upload=UploadConfig(rate=rate))
        req = await start_node(tmp_path, "req", [sn.url],
                          fetch=FetchConfig(lookup_timeout=5.0, peer_timeout=peer_timeout,
                                            hedge_after=60.0))
        try:
            wants = wants_of(tmp_path, [chunk(n) for n in sizes])
            await seeded(sn, wants, slow)
            for w in wants:  # strip the source: only the slow peer can serve now
                (tmp_path / "blobs" / w.blob).unlink(missing_ok=True)
            t0 = time.monotonic()
            got = await asyncio.wait_for(req.fetcher.get_many(wants), 30)
            assert time.monotonic() - t0 > peer_timeout  # it ran past peer_timeout in all
            assert all(o.origin == "peer" and o.error is None for o in got)
            assert sum(req.metrics.bad_peer_reports.labels(r)._value.get()
                       for r in ("timeout", "error", "corrupt", "refused")) == 0
        finally:
            for p in (req, slow):
                await p.close()
            await sn.close()

    run(go())


def test_a_source_fetch_longer_than_its_lease_keeps_it(tmp_path: Path) -> None:
    """A node fetching a chunk from a slow source under a lease renews the lease while it
    fetches: another node asking meanwhile, after several ``leases.ttl``, is pointed at it
    (``fetching``) instead of being granted the lease and fetching the chunk too."""
    async def go() -> None:
        sn = await start_supernode(SupernodeConfig(listen=HostPort("127.0.0.1", 0),
                                                   leases=LeaseConfig(ttl=0.6)))
        a = await start_node(tmp_path, "a", [sn.url], fetch=FetchConfig(lookup_timeout=5.0))
        b = await start_node(tmp_path, "b", [sn.url], fetch=FetchConfig(lookup_timeout=5.0))
        try:
            assert a.swarm is not None and b.swarm is not None
            for _ in range(250):
                if a.swarm.lease_ttl is not None and b.swarm.connected:
                    break
                await asyncio.sleep(0.02)
            assert a.swarm.lease_ttl == pytest.approx(0.6)  # the supernode said
            wants = wants_of(tmp_path, [chunk(50_000)])
            (w,) = wants
            assert w.source is not None
            backend = a.sources.backend(w.source)
            stream_many = backend.stream_many

            async def slow_read(reqs: Any, sink: Any) -> None:  # a slow source link
                await asyncio.sleep(2.5)
                await stream_many(reqs, sink)

            backend.stream_many = slow_read  # type: ignore[method-assign,assignment]
            fetch = asyncio.create_task(a.fetcher.get_many(wants))
            await asyncio.sleep(1.8)  # three lease lifetimes into the source read
            found = await b.swarm.lookup([w.digest], {w.digest: w.size}, expect=False)
            assert found is not None
            assert w.digest not in found.leases
            assert found.fetching[w.digest].id == "a"
            (o,) = await asyncio.wait_for(fetch, 30)
            assert o.origin == "source" and o.error is None
        finally:
            for p in (b, a):
                await p.close()
            await sn.close()

    run(go())


def test_tiny_chunks_come_from_the_source_in_few_big_reads(tmp_path: Path) -> None:
    """A node leasing 600 chunks of 300 bytes (180 KB, within ``leases.bytes``) gets all the
    leases and reads them from the source in a few pieces (ranged reads of the blob, one per
    bulk lookup of up to 256 digests), not ten: in regions of tiny files the registry link
    went idle for seconds while each node read 64-chunk pieces a few at a time."""
    async def go() -> None:
        sn = await start_supernode(SupernodeConfig(listen=HostPort("127.0.0.1", 0)))
        a = await start_node(tmp_path, "a", [sn.url], fetch=FetchConfig(lookup_timeout=5.0))
        try:
            assert a.swarm is not None
            for _ in range(250):
                if a.swarm.connected:
                    break
                await asyncio.sleep(0.02)
            wants = wants_of(tmp_path, [chunk(300) for _ in range(600)])
            assert wants[0].source is not None
            backend = a.sources.backend(wants[0].source)
            stream_many = backend.stream_many
            reads: list[int] = []

            async def counted(reqs: Any, sink: Any) -> None:
                reads.append(len(reqs))
                await stream_many(reqs, sink)

            backend.stream_many = counted  # type: ignore[method-assign,assignment]
            got = await asyncio.wait_for(a.fetcher.get_many(wants, bulk=True), 30)
            assert all(o.origin == "source" and o.error is None for o in got)
            assert sum(reads) == 600 and len(reads) <= 3, reads
            assert a.metrics.source_fetches.labels("leased")._value.get() == 600
        finally:
            await a.close()
            await sn.close()

    run(go())


def test_only_chunks_on_their_way_count_as_fetching(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bulk fetch wants all its chunks from the start but asks for a window's worth at a
    time: only those asked of a peer (or read from the source) count as ``fetching``, which
    is what the upload server waits for when asked for a chunk it does not hold yet. Counting
    every wanted chunk made nodes wait 1.5 s at a time on peers that had not asked for a
    chunk either, and the end of a fan-out stood still for seconds."""
    monkeypatch.setattr(fetcher, "BULK_WINDOW", 50_000)
    monkeypatch.setattr(fetcher, "PEER_BATCH_BYTES", 50_000)

    async def go() -> None:
        sn = await start_supernode(SupernodeConfig(listen=HostPort("127.0.0.1", 0)))
        slow = await start_node(tmp_path, "slow", [sn.url], upload=UploadConfig(rate=16 << 10))
        req = await start_node(tmp_path, "req", [sn.url],
                          fetch=FetchConfig(lookup_timeout=5.0, peer_timeout=60.0))
        try:
            # 40 kB at 16 KiB/s after a second's burst: each chunk takes about 2 s
            wants = wants_of(tmp_path, [chunk(40_000) for _ in range(3)])
            await seeded(sn, wants, slow)
            (tmp_path / "blobs" / wants[0].blob).unlink()  # only the slow peer has them
            first, last = wants[0].digest, wants[-1].digest
            task = asyncio.create_task(req.fetcher.get_many(wants, bulk=True))
            for _ in range(500):  # bounded: 10 s until the first request is on its way
                if req.fetcher.fetching(first):
                    break
                await asyncio.sleep(0.02)
            assert req.fetcher.fetching(first)
            assert last in req.fetcher._inflight  # wanted ...
            assert not req.fetcher.fetching(last)  # ... but not asked of anyone yet
            got = await asyncio.wait_for(task, 60)
            assert all(o.origin == "peer" and o.error is None for o in got)
            assert not any(req.fetcher.fetching(w.digest) for w in wants)  # all arrived
        finally:
            for p in (req, slow):
                await p.close()
            await sn.close()

    run(go())


def test_a_chunk_asked_of_a_peer_is_waited_for_briefly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The upload server waits for a chunk its node reads from the source (it comes for
    sure), but only ``PEER_WAIT`` for one its node asked of a peer: that peer may be waiting
    on this node in turn (peers expected to hold a chunk are pointed at each other, and at
    the end of an image every node wants its last chunks at once). Here the holder never
    answers (a socket that accepts and stays silent): asked for the chunk, ``req`` says it
    does not hold it well before ``INFLIGHT_WAIT``, made a minute here."""
    monkeypatch.setattr(upload, "INFLIGHT_WAIT", 60.0)
    monkeypatch.setattr(upload, "PEER_WAIT", 0.2)

    async def go() -> None:
        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(3600)

        frozen = await asyncio.start_server(mute, "127.0.0.1", 0)
        port = frozen.sockets[0].getsockname()[1]
        sn = await start_supernode(SupernodeConfig(listen=HostPort("127.0.0.1", 0)))
        req = await start_node(tmp_path, "req", [sn.url],
                               fetch=FetchConfig(lookup_timeout=5.0, peer_timeout=60.0,
                                                 hedge_after=60.0))
        task: asyncio.Task[list[fetcher.Outcome]] | None = None
        try:
            (want,) = wants_of(tmp_path, [chunk(20_000)])
            d = want.digest
            await sn.scheduler.register(PeerInfo(id="silent", address=f"http://127.0.0.1:{port}",
                                                 zone="", labels={}, capacity=8))
            assert await sn.scheduler.announce("silent", [d]) == 1
            task = asyncio.create_task(req.fetcher.get_many([want]))
            for _ in range(500):  # bounded: 10 s until it is asked of the silent peer
                if req.fetcher.fetching(d):
                    break
                await asyncio.sleep(0.02)
            assert req.fetcher.fetching(d) and not req.fetcher.from_source(d)
            async with aiohttp.ClientSession() as http:
                resp = await asyncio.wait_for(http.get(f"{req.url}/chunks/{d}"), 20)
                assert resp.status == 404
                resp = await asyncio.wait_for(
                    http.post(f"{req.url}/chunks", json={"digests": [d]}), 20)
                body = await resp.read()
            (frame,) = chunkfile.iter_frames(body)
            assert frame.status == chunkfile.FRAME_NOT_FOUND
            assert not task.done()  # still waiting on the silent peer all along
        finally:
            if task is not None:
                task.cancel()
            await req.close()
            await sn.close()
            frozen.close()

    run(go())


@contextlib.asynccontextmanager
async def _slow_holder_first(tmp: Path, *, size: int, rate: int, hedge_after: float
                             ) -> AsyncIterator[tuple[RunningPeer, RunningPeer, ChunkWant]]:
    """One chunk of ``size`` bytes that only peers have (the source blob is gone): a
    requester, a holder uploading at ``rate`` in its zone (so the supernode ranks it first,
    every time) and another holder in another zone. Yields (requester, other holder, want)."""
    sn = await start_supernode(SupernodeConfig(listen=HostPort("127.0.0.1", 0)))
    slow = await start_node(tmp, "slow", [sn.url], upload=UploadConfig(rate=rate), zone="z1")
    other = await start_node(tmp, "other", [sn.url], zone="z2")
    req = await start_node(tmp, "req", [sn.url], zone="z1",
                      fetch=FetchConfig(lookup_timeout=5.0, hedge_after=hedge_after,
                                        peer_timeout=60.0))
    try:
        wants = wants_of(tmp, [chunk(size)])
        await seeded(sn, wants, slow, other)
        (tmp / "blobs" / wants[0].blob).unlink()  # only peers can serve now
        yield req, other, wants[0]
    finally:
        for p in (req, other, slow):
            await p.close()
        await sn.close()


def test_bulk_end_game_does_not_hedge_a_big_chunk_that_is_moving(tmp_path: Path) -> None:
    """The last chunk of a bulk fetch is one big chunk coming slowly but steadily from its
    peer (a ``PROGRESS_PIECE`` every quarter second, no whole chunk for seconds): it is not
    hedged, so no other holder is asked and no byte crosses a link twice. It was: progress
    counted whole chunks only, and in the fan-out every node received ~5% of the image
    twice."""
    async def go() -> None:
        # 1.2 MB at 256 KiB/s after a second's burst: ~3.5 s, longer than hedge_after
        async with _slow_holder_first(tmp_path, size=1_200_000, rate=256 << 10,
                                      hedge_after=1.5) as (req, other, want):
            uploaded = other.metrics.uploads._value.get()
            t0 = time.monotonic()
            (o,) = await asyncio.wait_for(req.fetcher.get_many([want], bulk=True), 30)
            assert o.origin == "peer" and o.error is None
            assert time.monotonic() - t0 > 1.5  # it did run past hedge_after
            assert other.metrics.uploads._value.get() == uploaded  # never asked
            assert req.metrics.duplicate_bytes._value.get() == 0

    run(go())


def test_bulk_end_game_hedges_a_stalled_request(tmp_path: Path) -> None:
    """The last chunk of a bulk fetch sits in a request to a peer that brings nothing (a
    slow uplink); with nothing else to ask, after ``hedge_after`` it is asked of another
    holder too, and the fetch ends long before the slow peer would have delivered."""
    async def go() -> None:
        # 25 s from the slow peer alone
        async with _slow_holder_first(tmp_path, size=400_000, rate=16 << 10,
                                      hedge_after=0.5) as (req, _, want):
            t0 = time.monotonic()
            (o,) = await asyncio.wait_for(req.fetcher.get_many([want], bulk=True), 20)
            assert o.origin == "peer" and o.error is None
            assert time.monotonic() - t0 < 10
            assert req.metrics.bad_peer_reports.labels("timeout")._value.get() == 0
            # The loser is cancelled and the window given back (the chunk's waiters were
            # answered as it landed, the bulk fetch ends just after).
            for _ in range(250):
                if req.fetcher._bulk_bytes == 0:
                    break
                await asyncio.sleep(0.02)
            assert req.fetcher._bulk_bytes == 0

    run(go())


def test_a_slow_local_disk_is_not_the_peers_timeout(tmp_path: Path) -> None:
    """The requester's own store is slow (a backed-up disk: each write takes longer than
    ``fetch.peer_timeout``) while the peer sends promptly: the peer is not reported as timed
    out, and every chunk arrives from it. The timeout measures the peer's progress; counting
    this node's own work in it got healthy peers reported and quarantined."""
    async def go() -> None:
        sn = await start_supernode(SupernodeConfig(listen=HostPort("127.0.0.1", 0)))
        holder = await start_node(tmp_path, "holder", [sn.url])
        req = await start_node(tmp_path, "req", [sn.url],
                               fetch=FetchConfig(lookup_timeout=5.0, peer_timeout=0.5,
                                                 hedge_after=30.0))
        try:
            wants = wants_of(tmp_path, [chunk(30_000) for _ in range(3)])
            await seeded(sn, wants, holder)
            (tmp_path / "blobs" / wants[0].blob).unlink()  # only the holder has them
            put = req.store.put

            async def slow_put(digest: str, data: bytes) -> list[str]:
                await asyncio.sleep(0.8)  # longer than peer_timeout
                return await put(digest, data)

            req.store.put = slow_put  # type: ignore[method-assign]
            got = await asyncio.wait_for(req.fetcher.get_many(wants), 30)
            assert all(o.origin == "peer" and o.error is None for o in got)
            assert req.metrics.bad_peer_reports.labels("timeout")._value.get() == 0
        finally:
            for p in (req, holder):
                await p.close()
            await sn.close()

    run(go())


def test_a_bulk_fetch_holds_no_chunk_bytes(tmp_path: Path) -> None:
    """A bulk fetch (prefetch, preheat: nobody reads its chunks yet) records its outcomes
    without the chunk bytes, so a request of a thousand chunks does not hold every landed
    one until its last lands; a reader that joins it gets the chunk from the store. A fetch
    of its own keeps the bytes it brought (delivered without reading the store back)."""
    async def go() -> None:
        node = await start_node(tmp_path, "a", [])
        try:
            wants = wants_of(tmp_path, [chunk(300_000) for _ in range(3)])
            assert wants[0].source is not None
            backend = node.sources.backend(wants[0].source)
            read, opened = backend.stream_many, asyncio.Event()

            async def gated(requests: Any, sink: Any) -> None:
                await opened.wait()
                await read(requests, sink)

            backend.stream_many = gated  # type: ignore[method-assign]
            bulk = asyncio.create_task(node.fetcher.get_many(wants, bulk=True))
            await asyncio.sleep(0)  # the bulk fetch owns the chunks now
            reader = asyncio.create_task(node.fetcher.get_many(wants))
            await asyncio.sleep(0)
            opened.set()
            lean, joined = await asyncio.wait_for(asyncio.gather(bulk, reader), 30)
            assert [o.origin for o in lean] == ["source"] * 3
            assert all(o.error is None and o.data is None for o in lean)
            assert [o.origin for o in joined] == ["source"] * 3  # joined, not from the store
            (stats,) = node.sources.stats().values()
            assert stats["bytes"] == sum(w.size for w in wants)  # one source read each
            for w in wants:
                assert await node.store.read(w.digest) is not None
            (more,) = wants_of(tmp_path / "more", [chunk(1000)])
            (own,) = await asyncio.wait_for(node.fetcher.get_many([more]), 30)
            assert own.origin == "source" and own.data is not None
            assert own.data == await node.store.read(more.digest)
        finally:
            await node.close()

    run(go())
