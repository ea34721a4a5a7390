"""Cut-through: a node passes a chunk on while it still arrives, and never an unverified whole.

Agents are real (``start_peer``, upload servers on loopback TCP), and so is the supernode; the
requester downstream is a plain aiohttp client reading the framed batch. The source is a
localfs blob whose reads the test paces piece by piece (:class:`_GatedSource`): a slow
registry link is what makes cut-through matter, and the test must know exactly which bytes
have arrived when it looks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dfagent.peer.agent import RunningPeer
from dfagent.peer.config import FetchConfig, UploadConfig
from dfagent.peer.fetcher import ChunkWant, Outcome
from dfagent.supernode.config import SupernodeConfig
from dfagent.supernode.server import RunningSupernode, start_supernode
from nydusfs.config import HostPort
from nydusfs.format import chunkfile
from nydusfs.storage.base import RangeRequest, Sink
from nydusfs.storage.retry import CountingBackend

from .helpers import Chunk, chunk, run, seeded, start_node, wants_of

PIECE = 64 << 10


class _GatedSource:
    """The node's source for a blob, paced by the test: each ``PIECE`` of a range waits for a
    go-ahead (``go.release()``). The bytes are the real blob's, the first one flipped when
    ``corrupt``."""

    def __init__(self, backend: CountingBackend, *, corrupt: bool = False) -> None:
        self.backend = backend
        self.corrupt = corrupt
        self.go = asyncio.Semaphore(0)
        backend.stream_many = self  # type: ignore[method-assign]

    async def __call__(self, requests: Sequence[RangeRequest], sink: Sink) -> None:
        datas = await self.backend.read_many(requests)
        for i, data in enumerate(datas):
            if self.corrupt:
                data = bytes([data[0] ^ 1]) + data[1:]
            for pos in range(0, len(data), PIECE):
                await self.go.acquire()
                sink(i, pos, data[pos:pos + PIECE])


async def _arriving(node: RunningPeer, digest: str, at_least: int) -> None:
    """Until ``at_least`` bytes of ``digest`` have arrived at ``node`` (bounded: 20 s)."""
    for _ in range(1000):
        a = node.fetcher.arrival(digest)
        if a is not None and a.size >= at_least:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"{at_least} bytes of the chunk did not arrive within 20 s")


async def _frame(resp: aiohttp.ClientResponse, want: ChunkWant) -> int:
    """Read a batch's frame header for ``want``; the chunk file's length."""
    raw, status, length = chunkfile.parse_frame_header(
        await asyncio.wait_for(resp.content.readexactly(chunkfile.FRAME_HEADER_SIZE), 10))
    assert (raw.hex(), status) == (want.digest, chunkfile.FRAME_ARRIVING)
    assert length == chunkfile.HEADER_SIZE + want.size
    return length


async def _nothing_more(resp: aiohttp.ClientResponse) -> None:
    """No further byte comes while the chunk is unverified (a short look: a wrong server
    that sent the last piece early would have it there at once)."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(resp.content.readexactly(1), 0.5)


def _ask(http: aiohttp.ClientSession, node: RunningPeer, want: ChunkWant,
         batch: bool) -> Any:
    """The request for ``want``: a batch of one (``POST /chunks``) or ``GET /chunks/{digest}``."""
    if batch:
        return http.post(f"{node.url}/chunks", json={"digests": [want.digest]})
    return http.get(f"{node.url}/chunks/{want.digest}")


async def _length(resp: aiohttp.ClientResponse, want: ChunkWant, batch: bool) -> int:
    """The chunk file's length the response announces (a frame's, or Content-Length)."""
    assert resp.status == 200
    if batch:
        return await _frame(resp, want)
    assert resp.content_length == chunkfile.HEADER_SIZE + want.size
    return resp.content_length


def _big(tmp: Path) -> tuple[Chunk, ChunkWant]:
    c = chunk(300_000)  # incompressible: a raw payload of 5 PIECEs, the last one short
    (w,) = wants_of(tmp, [c])
    assert w.size == 300_000
    return c, w


async def _all_but_the_last(node: RunningPeer, w: ChunkWant, gate: _GatedSource) -> None:
    """Let four of the chunk's five pieces through ``gate``; return once ``node`` has them."""
    for _ in range(4):
        gate.go.release()
    await _arriving(node, w.digest, chunkfile.HEADER_SIZE + 4 * PIECE)


@contextlib.asynccontextmanager
async def _source_fetch(tmp: Path, *, corrupt: bool = False) -> AsyncIterator[
        tuple[RunningPeer, Chunk, ChunkWant, _GatedSource, asyncio.Task[list[Outcome]]]]:
    """A node (no supernode) fetching :func:`_big`'s chunk through a gated source, four of
    its five pieces in: (node, chunk, want, gate, the fetch)."""
    node = await start_node(tmp, "a", [])
    try:
        c, w = _big(tmp)
        assert w.source is not None
        gate = _GatedSource(node.sources.backend(w.source), corrupt=corrupt)
        fetch = asyncio.create_task(node.fetcher.get_many([w]))
        await _all_but_the_last(node, w, gate)
        yield node, c, w, gate, fetch
    finally:
        await node.close()


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "get"])
def test_a_chunk_from_the_source_is_served_while_it_arrives(tmp_path: Path,
                                                            batch: bool) -> None:
    """A peer asking for a chunk this node is reading from the source gets its bytes as they
    come off the source, all but the last piece, which follows only once the node has the
    whole chunk verified; the requester ends up with exactly the chunk file."""
    async def go() -> None:
        async with _source_fetch(tmp_path) as (node, c, w, gate, fetch):
            async with aiohttp.ClientSession() as http, _ask(http, node, w, batch) as resp:
                length = await _length(resp, w, batch)
                first = await asyncio.wait_for(
                    resp.content.readexactly(chunkfile.HEADER_SIZE + 4 * PIECE), 10)
                assert not fetch.done() and w.digest not in node.store
                await _nothing_more(resp)
                gate.go.release()  # the last piece: the node verifies, then sends it
                rest = await asyncio.wait_for(resp.content.readexactly(length - len(first)),
                                              10)
                assert first + rest == c.file
                assert await resp.read() == b""  # and the batch ends
            (o,) = await asyncio.wait_for(fetch, 10)
            assert o.origin == "source" and o.error is None
            assert node.metrics.uploads._value.get() == 1

    run(go())


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "get"])
def test_bad_source_bytes_cut_the_requester_off(tmp_path: Path, batch: bool) -> None:
    """The source sends a corrupt chunk: the node finds out when its last byte is in, and the
    peer reading it meanwhile is cut off mid-body: it never holds a complete chunk file the
    node did not verify (it would verify it itself, and report this node as bad)."""
    async def go() -> None:
        async with _source_fetch(tmp_path, corrupt=True) as (node, _, w, gate, fetch):
            async with aiohttp.ClientSession() as http, _ask(http, node, w, batch) as resp:
                length = await _length(resp, w, batch)
                first = await asyncio.wait_for(
                    resp.content.readexactly(chunkfile.HEADER_SIZE + 4 * PIECE), 10)
                gate.go.release()
                with pytest.raises((aiohttp.ClientError, asyncio.IncompleteReadError)):
                    await asyncio.wait_for(resp.content.readexactly(length - len(first)), 10)
            (o,) = await asyncio.wait_for(fetch, 10)
            assert o.error is not None and o.error.code == "integrity"
            assert w.digest not in node.store and node.fetcher.arrival(w.digest) is None
            assert node.metrics.verification_failures.labels("source")._value.get() == 1

    run(go())


@contextlib.asynccontextmanager
async def _slow_holder(tmp: Path, **fetch: Any) -> AsyncIterator[
        tuple[RunningSupernode, RunningPeer, RunningPeer]]:
    """A supernode, A with a slow uplink (400 kB take about 5 s: 64 KiB/s after a second's
    burst) and B, which waits on peers long and does not hedge (more ``fetch`` settings)."""
    sn = await start_supernode(SupernodeConfig(listen=HostPort("127.0.0.1", 0)))
    a = await start_node(tmp, "a", [sn.url], upload=UploadConfig(rate=64 << 10))
    b = await start_node(tmp, "b", [sn.url],
                         fetch=FetchConfig(lookup_timeout=5.0, peer_timeout=60.0,
                                           hedge_after=60.0, **fetch))
    try:
        yield sn, a, b
    finally:
        for p in (b, a):
            await p.close()
        await sn.close()


@contextlib.asynccontextmanager
async def _relayed(b: RunningPeer, w: ChunkWant) -> AsyncIterator[
        tuple[asyncio.Task[list[Outcome]], aiohttp.ClientResponse, int, bytes]]:
    """B fetching ``w`` from its peer, and C asking B for it once it arrives at B: (B's
    fetch, C's batch response, the chunk file's length, the first PIECE C got)."""
    fetch = asyncio.create_task(b.fetcher.get_many([w]))
    await _arriving(b, w.digest, 1)
    async with aiohttp.ClientSession() as http, \
            http.post(f"{b.url}/chunks", json={"digests": [w.digest]}) as resp:
        length = await _frame(resp, w)
        first = await asyncio.wait_for(resp.content.readexactly(PIECE), 10)
        yield fetch, resp, length, first


def test_a_chunk_from_a_peer_is_passed_on_while_it_arrives(tmp_path: Path) -> None:
    """B fetches a chunk from A, whose uplink is slow; C, asking B meanwhile (the supernode
    names B as expected to hold it), gets B's bytes as they come, long before B has the
    chunk, and the whole chunk file in the end."""
    async def go() -> None:
        async with _slow_holder(tmp_path) as (sn, a, b):
            c = chunk(400_000)
            (w,) = wants_of(tmp_path, [c])
            await seeded(sn, [w], a)
            (tmp_path / "blobs" / w.blob).unlink()  # only A has it now
            async with _relayed(b, w) as (fetch, resp, length, first):
                assert not fetch.done() and w.digest not in b.store
                rest = await asyncio.wait_for(resp.content.readexactly(length - PIECE), 30)
                assert first + rest == c.file
            (o,) = await asyncio.wait_for(fetch, 30)
            assert o.origin == "peer" and o.error is None

    run(go())


def test_bad_bytes_from_upstream_are_not_passed_on_whole(tmp_path: Path) -> None:
    """A serves a corrupt chunk file (slowly); B, receiving it, passes its bytes on to C but
    not the last piece: B's verification fails, C is cut off, and B reports A."""
    async def go() -> None:
        async with _slow_holder(tmp_path, k=1) as (sn, a, b):
            c = chunk(400_000)
            (w,) = wants_of(tmp_path, [c])
            bad = bytearray(c.file)
            bad[-1] ^= 1  # the payload's last byte: the file still parses
            await a.store.put(w.digest, bytes(bad))
            assert a.swarm is not None
            a.swarm.announce([w.digest])
            for _ in range(500):  # bounded: 10 s until the supernode lists A
                if (await sn.scheduler.lookup([w.digest], k=1)).chunks.get(w.digest):
                    break
                await asyncio.sleep(0.02)
            (tmp_path / "blobs" / w.blob).unlink()  # only A has it, and A's copy is bad
            async with _relayed(b, w) as (fetch, resp, length, first):
                assert first == bytes(bad[:PIECE])
                with pytest.raises((aiohttp.ClientError, asyncio.IncompleteReadError)):
                    await asyncio.wait_for(resp.content.readexactly(length - PIECE), 30)
            (o,) = await asyncio.wait_for(fetch, 30)
            assert o.error is not None  # nobody else has it, and the source blob is gone
            assert w.digest not in b.store
            assert b.metrics.bad_peer_reports.labels("corrupt")._value.get() == 1

    run(go())


def test_a_requester_cut_off_by_a_failing_source_does_not_blame_the_peer(tmp_path: Path) -> None:
    """B asks A for a chunk A is reading from the source under its lease; A passes it on while
    it arrives (an *arriving* frame), then finds the source's bytes bad and cuts B off. B does
    not report A (the chunk failed on its way to A, not A's fault: reports quarantine nodes),
    and gets the chunk from the source itself in the end."""
    async def go() -> None:
        sn = await start_supernode(SupernodeConfig(listen=HostPort("127.0.0.1", 0)))
        fetch = FetchConfig(lookup_timeout=5.0, peer_timeout=60.0, hedge_after=60.0,
                            lease_wait=1.0)
        a = await start_node(tmp_path, "a", [sn.url], fetch=fetch)
        b = await start_node(tmp_path, "b", [sn.url], fetch=fetch)
        try:
            for _ in range(250):  # bounded: 5 s until both are registered
                if a.swarm is not None and b.swarm is not None and a.swarm.connected and \
                        b.swarm.connected:
                    break
                await asyncio.sleep(0.02)
            c, w = _big(tmp_path)
            assert w.source is not None
            gate = _GatedSource(a.sources.backend(w.source), corrupt=True)
            a_fetch = asyncio.create_task(a.fetcher.get_many([w]))
            await _all_but_the_last(a, w, gate)
            b_fetch = asyncio.create_task(b.fetcher.get_many([w]))
            for _ in range(500):  # bounded: 10 s until B is reading it from A
                if a.metrics.uploads_active._value.get() > 0:
                    break
                await asyncio.sleep(0.02)
            gate.go.release()  # the bad last piece: A's verification fails, B is cut off
            (oa,) = await asyncio.wait_for(a_fetch, 10)
            assert oa.error is not None and oa.error.code == "integrity"
            (ob,) = await asyncio.wait_for(b_fetch, 30)
            assert ob.error is None and ob.data == c.file  # from the source, in the end
            assert b.metrics.cut_through.labels("lost")._value.get() == 1
            assert sum(b.metrics.bad_peer_reports.labels(r)._value.get()
                       for r in ("corrupt", "timeout", "refused", "error")) == 0
            assert a.metrics.cut_through.labels("cut")._value.get() == 1
        finally:
            for p in (b, a):
                await p.close()
            await sn.close()

    run(go())
