"""The agent's registration under a slow supernode: one slow lookup is not a dead supernode.

A real supernode in-process (``start_supernode``) and a real agent; the supernode's lookup is
made slow by wrapping its scheduler (a loaded supernode answering late cannot be produced on
demand otherwise).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dfagent.peer.agent import start_peer
from dfagent.peer.config import FetchConfig, PeerConfig
from dfagent.peer.fetcher import ChunkWant
from dfagent.peer.source import parse_location
from dfagent.supernode.config import SupernodeConfig
from dfagent.supernode.model import PeerInfo
from dfagent.supernode.server import start_supernode
from nydusfs.config import HostPort

from .helpers import blob_of, chunk, run


async def _until(cond: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(500):  # bounded
        if await cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_slow_lookup_keeps_the_peer_registered_and_its_leases(tmp_path: Path) -> None:
    async def go() -> None:
        # Heartbeats every second, so losing the peer below is found out fast.
        sn = await start_supernode(SupernodeConfig(listen=HostPort("127.0.0.1", 0),
                                                   peer_ttl=3.0))
        node = await start_peer(PeerConfig(
            id="n", listen=HostPort("127.0.0.1", 0), socket=tmp_path / "n.sock",
            data_dir=tmp_path / "n", supernodes=(sn.url,),
            fetch=FetchConfig(lookup_timeout=0.2)))
        sched = sn.scheduler
        real = sched.lookup
        release = asyncio.Event()

        async def slow(*args: Any, **kw: Any) -> Any:
            async with asyncio.timeout(30):
                await release.wait()  # answers only after the client gave up on it
            return await real(*args, **kw)

        try:
            swarm = node.swarm
            assert swarm is not None and swarm.connected and swarm.registrations == 1
            # A lease the peer holds (another peer would be pointed at it).
            held = chunk(1000)
            got = await real([held.digest], requester="n", lease=True)
            assert got.leases == [held.digest]

            _, items = blob_of([chunk(2000)], tmp_path / "blobs")
            loc = parse_location({"type": "localfs", "dir": str(tmp_path / "blobs")}, "s")
            wants = [ChunkWant(i["digest"], loc, i["blob"], i["offset"], i["size"],
                               i["uncompressed_size"], i["flags"]) for i in items]
            sched.lookup = slow  # type: ignore[method-assign]
            (o,) = await asyncio.wait_for(node.fetcher.get_many(wants), 30)
            assert o.origin == "source" and o.error is None  # not stalled on the supernode
            assert node.metrics.source_fetches.labels("direct")._value.get() == 1
            assert swarm.connected  # one slow answer: still registered ...
            release.set()
            sched.lookup = real  # type: ignore[method-assign]
            # ... the heartbeat it triggered finds the supernode alive; nothing was reset.
            await _until(lambda: _announced(sched, o.digest), "the announcement")
            assert swarm.registrations == 1
            await sched.register(PeerInfo(id="other", address="http://127.0.0.1:9", zone="",
                                          labels={}, capacity=8))
            again = await real([held.digest], requester="other", lease=True)
            assert again.fetching == {held.digest: "n"} and again.leases == []

            # Lost by the supernode (as after a restart): registers again, without reset,
            # and re-announces its store.
            await sched.leave("n")
            await _until(lambda: _registered(sched, swarm), "the new registration")
            await _until(lambda: _announced(sched, o.digest), "the re-announcement")
        finally:
            release.set()
            await node.close()
            await sn.close()

    run(go())


async def _announced(sched: Any, digest: str) -> bool:
    got = await sched.lookup([digest], requester="someone-else")
    return bool(got.chunks.get(digest))


async def _registered(sched: Any, swarm: Any) -> bool:
    return bool(swarm.registrations == 2 and swarm.connected)
