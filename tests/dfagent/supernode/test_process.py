"""``dfagent supernode`` as users run it: real processes, real sockets, a real Redis.

Also the client's failover against those processes: a replica killed (connection refused), a
replica frozen with SIGSTOP (accepts connections, never answers: a slow supernode), and all
of them gone. Every process is stopped by its PID in ``finally`` blocks.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from dfagent.errors import SupernodeUnavailable, Unauthorized, UnknownPeer
from dfagent.supernode.client import SupernodeClient
from dfagent.supernode.config import SupernodeConfig
from dfagent.supernode.model import PeerLoad
from dfagent.supernode.server import start_supernode
from nydusfs.config import HostPort

from .helpers import (
    FakeClock,
    RedisServer,
    SupernodeProcess,
    _dfagent_cmd,
    digests,
    free_port,
    peer,
    run,
    start_supernode_process,
    stop_process,
)

TOKEN = "process-test-token-0123456789"


async def lookup_requests(url: str) -> float:
    """How many lookup requests a supernode has served (from its /metrics)."""
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        text = await resp.text()
    m = re.search(r'^dfagent_supernode_request_seconds_count\{endpoint="lookup"\} (\S+)$',
                  text, re.M)
    return float(m.group(1)) if m else 0.0


def test_supernode_process_with_token(tmp_config: Callable[[str], Path]) -> None:
    sn = start_supernode_process(tmp_config(f"listen: 127.0.0.1:0\ntoken: {TOKEN}\n"))
    ds = digests(4)
    try:
        async def go() -> None:
            async with SupernodeClient([sn.url], token=TOKEN, timeout=5) as c:
                reg = await c.register(peer("p1", zone="z"), reset=True)
                assert reg.supernode == sn.url and reg.peer_ttl == 30.0
                await c.register(peer("p2", port=9002))
                assert await c.announce("p1", ds) == 4
                await c.heartbeat("p1", PeerLoad(1, 1 << 20))
                got = await c.lookup(ds + digests(1, 50), requester="p2")
                assert {d: [p.id for p in ps] for d, ps in got.items()} == \
                    {**{d: ["p1"] for d in ds}, digests(1, 50)[0]: []}
                assert got[ds[0]][0].address == "http://127.0.0.1:9000"
                with pytest.raises(UnknownPeer):
                    await c.heartbeat("nobody")
            for token in (None, "not-the-token-0123456789"):
                async with SupernodeClient([sn.url], token=token, timeout=5) as c:
                    with pytest.raises(Unauthorized, match="401"):
                        await c.lookup(ds)
            async with aiohttp.ClientSession() as http, \
                    http.post(sn.url + "/api/v1/lookup", json={"digests": ds}) as resp:
                assert resp.status == 401

        run(go())
    finally:
        status = stop_process(sn.proc, signal.SIGTERM)
    assert status == 0, "".join(sn.lines)
    assert any("stopping" in line for line in sn.lines)


def test_sigint_also_stops_cleanly(tmp_config: Callable[[str], Path]) -> None:
    sn = start_supernode_process(tmp_config("listen: 127.0.0.1:0\n"))
    assert stop_process(sn.proc, signal.SIGINT) == 0, "".join(sn.lines)


def test_bad_config_is_one_line(tmp_config: Callable[[str], Path]) -> None:
    path = tmp_config("listen: 127.0.0.1:0\nquarantine: {reports: 0}\n")
    proc = subprocess.run([*_dfagent_cmd(), "supernode", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == \
        ["dfagent: error: quarantine.reports: must be >= 1, got 0"]


def test_port_in_use_is_one_line(tmp_config: Callable[[str], Path]) -> None:
    sn = start_supernode_process(tmp_config("listen: 127.0.0.1:0\n"))
    try:
        port = sn.url.rsplit(":", 1)[1]
        proc = subprocess.run(
            [*_dfagent_cmd(), "supernode", "--listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 1
        assert re.fullmatch(r"dfagent: error: listen 127\.0\.0\.1:\d+: cannot bind: .*",
                            proc.stderr.strip()), proc.stderr
    finally:
        stop_process(sn.proc)


def test_redis_replicas_and_client_failover(redis_server: RedisServer,
                                            tmp_config: Callable[[str], Path]) -> None:
    prefix = f"proc-{uuid.uuid4().hex[:8]}:"
    text = f"listen: 127.0.0.1:0\nstore: {{type: redis, url: '{redis_server.url}', " \
           f"prefix: '{prefix}'}}\n"
    a = start_supernode_process(tmp_config(text))
    b: SupernodeProcess | None = None
    ds = digests(3)
    try:
        b = start_supernode_process(tmp_config(text))
        b_url = b.url
        clock = FakeClock()

        async def go() -> None:
            # One cluster: registered and announced through A, found through B.
            async with SupernodeClient([a.url], timeout=5) as ca:
                await ca.register(peer("seed", port=9100), reset=True)
                await ca.register(peer("leech", port=9101), reset=True)
                await ca.announce("seed", ds)
            async with SupernodeClient([b_url], timeout=5) as cb:
                got = await cb.lookup(ds, requester="leech")
                assert all([p.id for p in got[d]] == ["seed"] for d in ds)

            client = SupernodeClient([a.url, b_url], timeout=0.5, retry_after=10, clock=clock)
            async with client:
                await client.lookup(ds)
                assert client.current == a.url
                # A frozen (SIGSTOP): it accepts the connection and never answers; the call
                # moves on to B after one timeout.
                a.proc.send_signal(signal.SIGSTOP)
                try:
                    t0 = time.monotonic()
                    got = await client.lookup(ds, requester="leech")
                    assert [p.id for p in got[ds[0]]] == ["seed"]
                    assert client.current == b_url
                    assert time.monotonic() - t0 < 0.5 * 2 + 5  # bounded: one timeout
                finally:
                    a.proc.send_signal(signal.SIGCONT)
                # A is back, but resting (and B is sticky): B keeps answering, A sees nothing.
                before = await lookup_requests(a.url)
                for _ in range(3):
                    await client.lookup(ds)
                clock.advance(11)
                await client.heartbeat("seed", PeerLoad(0, 0))
                await client.lookup(ds)
                assert client.current == b_url
                assert await lookup_requests(a.url) == before
                # Killing a replica loses nothing: the state is in Redis.
                stop_process(a.proc, signal.SIGKILL)
                got = await client.lookup(ds, requester="leech")
                assert [p.id for p in got[ds[0]]] == ["seed"]

        run(go())
        # All replicas gone: a clear error within a bounded time, never a hang.
        stop_process(b.proc, signal.SIGKILL)

        async def all_down() -> None:
            async with SupernodeClient([a.url, b_url], timeout=0.5) as c:
                t0 = time.monotonic()
                with pytest.raises(SupernodeUnavailable, match="no supernode answered"):
                    await c.lookup(ds)
                assert time.monotonic() - t0 < 0.5 * 2 + 5

        run(all_down())
    finally:
        stop_process(a.proc)
        if b is not None:
            stop_process(b.proc)


def test_client_skips_a_supernode_that_answers_nonsense() -> None:
    """A broken replica (a fault no real supernode produces on purpose): its answer names a
    peer it does not describe; the client treats that as a failure and asks the next one."""
    good_digest = digests(1)[0]

    async def garbage(request: web.Request) -> web.Response:
        return web.json_response({"chunks": {good_digest: ["ghost"]}, "peers": {}})

    async def go() -> None:
        app = web.Application()
        app.router.add_post("/api/v1/lookup", garbage)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        real = await start_supernode(SupernodeConfig(listen=HostPort("127.0.0.1", 0)),
                                     sweeper=False)
        try:
            async with SupernodeClient([f"http://127.0.0.1:{port}", real.url],
                                       timeout=5) as c:
                await c.register(peer("seed"))
                await c.announce("seed", [good_digest])
                got = await c.lookup([good_digest])
                assert [p.id for p in got[good_digest]] == ["seed"]
                assert c.current == real.url
        finally:
            await real.close()
            await runner.cleanup()

    run(go())


def test_client_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        SupernodeClient([])
    with pytest.raises(ValueError, match="non-empty list"):
        SupernodeClient("http://one:1")
    with pytest.raises(ValueError, match="http"):
        SupernodeClient(["ftp://x:1"])

    async def go() -> None:
        async with SupernodeClient(["http://127.0.0.1:1"]) as c:
            with pytest.raises(ValueError, match="reason"):
                await c.report("a", reporter="b", reason="meh")
            assert await c.lookup([]) == {}
            assert await c.announce("a", []) == 0

    run(go())


def test_client_splits_big_batches() -> None:
    async def go() -> None:
        sn = await start_supernode(SupernodeConfig(listen=HostPort("127.0.0.1", 0)),
                                   sweeper=False)
        ds = digests(12_000)
        try:
            async with SupernodeClient([sn.url], timeout=10) as c:
                await c.register(peer("a"))
                await c.register(peer("b"))
                assert await c.announce("a", ds) == 12_000  # 2 requests
                got = await c.lookup(ds[:2500] + digests(10, 50_000), requester="b")  # 3
                assert len(got) == 2510
                assert sum(1 for v in got.values() if v) == 2500
                assert await c.withdraw("a", ds[:10_500]) == 10_500
        finally:
            await sn.close()

    run(go())
