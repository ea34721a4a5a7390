"""The HTTP API (docs/api.md) served on a real loopback socket, spoken to as raw HTTP.

The server runs in-process (``start_supernode``) so a fake clock can drive expiry; the process
as users run it is covered by test_process.py.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dfagent.errors import ConfigError, SupernodeUnavailable
from dfagent.metrics import METRIC_NAMES
from dfagent.supernode.client import SupernodeClient
from dfagent.supernode.config import SupernodeConfig, TlsConfig
from dfagent.supernode.peerstore.redis import RedisPeerStore
from dfagent.supernode.scheduler import Clock
from dfagent.supernode.server import RunningSupernode, start_supernode
from nydusfs.config import HostPort

from .helpers import FakeClock, digest, digests, free_port, peer, run

TOKEN = "cluster-token-0123456789"
BASE = SupernodeConfig(listen=HostPort("127.0.0.1", 0))
D = digest(0)


@asynccontextmanager
async def serving(config: SupernodeConfig = BASE, *, clock: Clock = time.time,
                  sweeper: bool = False, **kw: Any
                  ) -> AsyncIterator[tuple[RunningSupernode, aiohttp.ClientSession]]:
    sn = await start_supernode(config, clock=clock, sweeper=sweeper, **kw)
    try:
        async with aiohttp.ClientSession(base_url=sn.url) as http:
            yield sn, http
    finally:
        await sn.close()


async def call(http: aiohttp.ClientSession, method: str, path: str, body: object = None, *,
               raw: str | bytes | None = None, token: str | None = None
               ) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    kw: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
    async with http.request(method, path, headers=headers, **kw) as resp:
        text = await resp.text()
        try:
            return resp.status, await resp.json(content_type=None)
        except ValueError:
            return resp.status, text


def register_body(port: int = 9000, **extra: object) -> dict[str, object]:
    return {"address": f"http://127.0.0.1:{port}", **extra}


VALIDATION = [
    ("PUT", "/api/v1/peers/a", {}, r"^address: required"),
    ("PUT", "/api/v1/peers/a", {"address": "ftp://h:1"}, r"^address: expected a URL"),
    ("PUT", "/api/v1/peers/a", {"address": "http://h:99999"}, r"^address: .*host and port"),
    ("PUT", "/api/v1/peers/a", {"address": "http://:80"}, r"^address: "),
    ("PUT", "/api/v1/peers/a", {"address": "http://h:1/x"}, r"^address: "),
    ("PUT", "/api/v1/peers/a", {"address": "http://u:p@h:1"}, r"^address: "),
    ("PUT", "/api/v1/peers/a", {"address": "http://h:1?q=1"}, r"^address: "),
    ("PUT", "/api/v1/peers/a", register_body(capacity=0), r"^capacity: must be between"),
    ("PUT", "/api/v1/peers/a", register_body(capacity="8"), r"^capacity: expected an integer"),
    ("PUT", "/api/v1/peers/-a", register_body(), r"^peer id: expected a peer id"),
    ("PUT", "/api/v1/peers/a", register_body(labels={"": "x"}), r"^labels: invalid label"),
    ("PUT", "/api/v1/peers/a", register_body(zone="a zone"), r"^zone: expected a zone"),
    ("PUT", "/api/v1/peers/a", register_body(extra=1), r"^extra: unknown field"),
    ("PUT", "/api/v1/peers/a", register_body(reset="yes"), r"^reset: expected true or false"),
    ("POST", "/api/v1/lookup", {"digests": []}, r"^digests: must not be empty"),
    ("POST", "/api/v1/lookup", {}, r"^digests: required"),
    ("POST", "/api/v1/lookup", {"digests": D}, r"^digests: expected a list"),
    ("POST", "/api/v1/lookup", {"digests": [D, D.upper()]},
     r"^digests\[1\]: expected a blake3 digest \(64 lowercase hex"),
    ("POST", "/api/v1/lookup", {"digests": [D, D[:-1]]}, r"^digests\[1\]: "),
    ("POST", "/api/v1/lookup", {"digests": [D, 7]}, r"^digests\[1\]: "),
    ("POST", "/api/v1/lookup", {"digests": digests(1001)},
     r"^digests: at most 1000 digests per request, got 1001"),
    ("POST", "/api/v1/lookup", {"digests": [D], "k": 0}, r"^k: must be between 1 and 64"),
    ("POST", "/api/v1/lookup", {"digests": [D], "k": 65}, r"^k: must be between 1 and 64"),
    ("POST", "/api/v1/lookup", {"digests": [D], "requester": "a b"}, r"^requester: "),
    ("POST", "/api/v1/lookup", [D], r"^<body>: expected a JSON object"),
    ("POST", "/api/v1/peers/a/heartbeat", {"active_uploads": -1},
     r"^active_uploads: must be between"),
    ("POST", "/api/v1/peers/a/announce", {"digests": digests(10_001)},
     r"^digests: at most 10000 digests per request"),
    ("POST", "/api/v1/peers/a/withdraw", {"digest": [D]}, r"^digest: unknown field"),
    ("POST", "/api/v1/peers/a/reports", {"reporter": "b", "reason": "meh"},
     r"^reason: expected one of corrupt, timeout, refused, error"),
    ("POST", "/api/v1/peers/a/reports", {"reporter": "b", "reason": "corrupt", "digest": "x"},
     r"^digest: expected a blake3 digest"),
    ("POST", "/api/v1/peers/a/reports", {"reason": "corrupt"}, r"^reporter: required"),
]


def test_bad_requests_are_400_naming_the_field() -> None:
    async def go() -> None:
        async with serving() as (_, http):
            for method, path, body, pattern in VALIDATION:
                status, data = await call(http, method, path, body)
                assert status == 400, (method, path, body, data)
                assert data["error"]["code"] == "bad_request"
                assert re.search(pattern, data["error"]["message"]), (pattern, data)
            status, data = await call(http, "POST", "/api/v1/lookup", raw="{not json")
            assert status == 400 and data["error"]["message"].startswith("<body>: not valid JSON")

    run(go())


def test_http_level_errors_are_json() -> None:
    async def go() -> None:
        async with serving() as (_, http):
            status, data = await call(http, "POST", "/api/v1/lookup",
                                      raw=b"{" + b" " * (3 << 20) + b"}")
            assert (status, data["error"]["code"]) == (413, "payload_too_large")
            status, data = await call(http, "GET", "/api/v1/nothing-here")
            assert (status, data["error"]["code"]) == (404, "not_found")
            status, data = await call(http, "GET", "/api/v1/lookup")
            assert (status, data["error"]["code"]) == (405, "method_not_allowed")

    run(go())


def test_token_required_on_api_only() -> None:
    cfg = replace(BASE, token=TOKEN)

    async def go() -> None:
        async with serving(cfg) as (_, http):
            for token in (None, "wrong-token-0123456789", TOKEN + "x", TOKEN[:-1]):
                for method, path, body in [("PUT", "/api/v1/peers/a", register_body()),
                                           ("POST", "/api/v1/lookup", {"digests": [D]}),
                                           ("GET", "/api/v1/peers/a", None)]:
                    status, data = await call(http, method, path, body, token=token)
                    assert (status, data["error"]["code"]) == (401, "unauthorized")
            async with http.post("/api/v1/lookup", json={"digests": [D]},
                                 headers={"Authorization": f"Basic {TOKEN}"}) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            status, _ = await call(http, "PUT", "/api/v1/peers/a", register_body(), token=TOKEN)
            assert status == 200
            status, data = await call(http, "POST", "/api/v1/lookup", {"digests": [D]},
                                      token=TOKEN)
            assert (status, data) == (200, {"chunks": {}, "peers": {}})
            for path in ("/healthz", "/readyz", "/metrics"):
                async with http.get(path) as resp:
                    assert resp.status == 200, path

    run(go())


def test_lookup_leases_are_bounded_in_bytes() -> None:
    """``sizes`` reach the lease budget over HTTP (leases.bytes), and are checked."""
    ds = digests(4)
    config = replace(BASE, leases=replace(BASE.leases, bytes=1000))

    async def go() -> None:
        async with serving(config) as (_, http):
            await call(http, "PUT", "/api/v1/peers/node-1", register_body(9001))
            status, data = await call(http, "POST", "/api/v1/lookup",
                                      {"digests": ds, "requester": "node-1", "lease": True,
                                       "sizes": [600, 300, 200, 100]})
            assert status == 200 and data["leases"] == [ds[0], ds[1], ds[3]]
            for sizes, pattern in (([1, 2], r"^sizes: expected a list of 4 sizes"),
                                   ([1, 2, 3, -1], r"^sizes\[3\]: must be between"),
                                   ([1, 2, 3, "x"], r"^sizes\[3\]: expected an integer")):
                status, data = await call(http, "POST", "/api/v1/lookup",
                                          {"digests": ds, "requester": "node-1",
                                           "lease": True, "sizes": sizes})
                assert status == 400 and re.search(pattern, data["error"]["message"]), data
            # expect: false (leases only) over HTTP, and checked
            status, data = await call(http, "POST", "/api/v1/lookup",
                                      {"digests": ds[3:], "requester": "node-1", "lease": True,
                                       "expect": False})
            assert status == 200 and data["leases"] == [ds[3]]  # its own lease, renewed
            status, data = await call(http, "POST", "/api/v1/lookup",
                                      {"digests": ds, "requester": "node-1", "lease": True,
                                       "expect": "no"})
            assert status == 400 and data["error"]["message"].startswith("expect: expected "
                                                                         "true or false"), data

    run(go())


def test_peer_lifecycle_and_lookup_format() -> None:
    ds = digests(3)

    async def go() -> None:
        async with serving() as (_, http):
            status, data = await call(http, "PUT", "/api/v1/peers/node-1",
                                      register_body(9001, zone="z1", labels={"rack": "r1"},
                                                    capacity=4))
            assert (status, data) == (200, {"id": "node-1", "peer_ttl": 30.0,
                                            "heartbeat_interval": 10.0, "lease_ttl": 10.0})
            await call(http, "PUT", "/api/v1/peers/node-2", register_body(9002, zone="z2"))
            assert await call(http, "POST", "/api/v1/peers/node-1/announce",
                              {"digests": ds}) == (200, {"added": 3})
            assert await call(http, "POST", "/api/v1/peers/node-1/announce",
                              {"digests": ds + ds}) == (200, {"added": 0})
            assert await call(http, "POST", "/api/v1/peers/node-1/heartbeat",
                              {"active_uploads": 2, "free_cache": 1 << 30}) == \
                (200, {"ok": True})
            status, data = await call(http, "POST", "/api/v1/lookup",
                                      {"digests": [*ds, digest(99)], "requester": "node-2"})
            assert status == 200
            assert data == {"chunks": {d: ["node-1"] for d in ds},
                            "peers": {"node-1": {"address": "http://127.0.0.1:9001",
                                                 "zone": "z1"}}}
            # The requester is never returned, even when it holds the chunk.
            await call(http, "POST", "/api/v1/peers/node-2/announce", {"digests": ds[:1]})
            _, data = await call(http, "POST", "/api/v1/lookup",
                                 {"digests": ds[:1], "requester": "node-1"})
            assert data["chunks"] == {ds[0]: ["node-2"]}
            status, data = await call(http, "GET", "/api/v1/peers/node-1")
            assert status == 200
            assert {k: data[k] for k in ("address", "zone", "labels", "capacity", "load",
                                         "live", "chunks", "quarantined_until")} == {
                "address": "http://127.0.0.1:9001", "zone": "z1", "labels": {"rack": "r1"},
                "capacity": 4, "load": {"active_uploads": 2, "free_cache": 1 << 30},
                "live": True, "chunks": 3, "quarantined_until": None}
            assert await call(http, "POST", "/api/v1/peers/node-1/withdraw",
                              {"digests": ds[:2]}) == (200, {"removed": 2})
            assert await call(http, "DELETE", "/api/v1/peers/node-1") == \
                (200, {"removed": True})
            assert await call(http, "DELETE", "/api/v1/peers/node-1") == \
                (200, {"removed": False})
            for method, path, body in [("POST", "/api/v1/peers/node-1/heartbeat", {}),
                                       ("POST", "/api/v1/peers/node-1/announce",
                                        {"digests": ds}),
                                       ("GET", "/api/v1/peers/node-1", None),
                                       ("POST", "/api/v1/peers/node-2/reports",
                                        {"reporter": "node-1", "reason": "corrupt"})]:
                status, data = await call(http, method, path, body)
                assert (status, data["error"]["code"]) == (404, "unknown_peer"), path
            _, data = await call(http, "POST", "/api/v1/lookup", {"digests": ds})
            assert data["chunks"] == {ds[0]: ["node-2"]}

    run(go())


def test_reports_quarantine_over_http() -> None:
    async def go() -> None:
        async with serving() as (_, http):
            for name in ("bad", "good", "r1", "r2", "r3"):
                await call(http, "PUT", f"/api/v1/peers/{name}", register_body())
            for name in ("bad", "good"):
                await call(http, "POST", f"/api/v1/peers/{name}/announce", {"digests": [D]})
            answers = [await call(http, "POST", "/api/v1/peers/bad/reports",
                                  {"reporter": r, "reason": "corrupt", "digest": D})
                       for r in ("r1", "r2", "r3")]
            assert [a[1] for a in answers] == [
                {"counted": True, "reports": 1, "quarantined": False},
                {"counted": True, "reports": 2, "quarantined": False},
                {"counted": True, "reports": 3, "quarantined": True}]
            _, data = await call(http, "POST", "/api/v1/lookup", {"digests": [D]})
            assert data["chunks"] == {D: ["good"]}
            status, data = await call(http, "POST", "/api/v1/peers/bad/reports",
                                      {"reporter": "bad", "reason": "corrupt"})
            assert status == 400 and "itself" in data["error"]["message"]

    run(go())


def test_expiry_with_fake_clock_over_http() -> None:
    clock = FakeClock()

    async def go() -> None:
        async with serving(clock=clock) as (sn, http):
            await call(http, "PUT", "/api/v1/peers/a", register_body())
            await call(http, "POST", "/api/v1/peers/a/announce", {"digests": [D]})
            clock.advance(31)
            _, data = await call(http, "POST", "/api/v1/lookup", {"digests": [D]})
            assert data["chunks"] == {}
            status, data = await call(http, "POST", "/api/v1/peers/a/heartbeat", {})
            assert (status, data["error"]["code"]) == (404, "unknown_peer")
            assert await sn.scheduler.sweep() == ["a"]

    run(go())


def test_background_sweeper_drops_silent_peers() -> None:
    cfg = replace(BASE, peer_ttl=0.2, sweep_interval=0.05)

    async def go() -> None:
        async with serving(cfg, sweeper=True) as (_, http):
            await call(http, "PUT", "/api/v1/peers/a", register_body())
            await call(http, "POST", "/api/v1/peers/a/announce", {"digests": [D]})
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                status, _ = await call(http, "GET", "/api/v1/peers/a")
                if status == 404:
                    break
                await asyncio.sleep(0.05)
            assert status == 404  # swept by the background task, not by a lookup
            async with http.get("/metrics") as resp:
                text = await resp.text()
            assert "dfagent_supernode_expirations_total 1.0" in text
            assert "dfagent_supernode_chunk_entries 0.0" in text

    run(go())


def test_metrics_export_every_name() -> None:
    async def go() -> None:
        async with serving() as (_, http):
            await call(http, "PUT", "/api/v1/peers/a", register_body())
            await call(http, "POST", "/api/v1/peers/a/announce", {"digests": digests(5)})
            await call(http, "POST", "/api/v1/lookup", {"digests": digests(8)})
            await call(http, "POST", "/api/v1/lookup", {"digests": ["bad"]})
            async with http.get("/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
        names = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) ", text, re.M)}
        assert set(METRIC_NAMES) <= names
        for line in ('dfagent_supernode_lookups_total{result="hit"} 5.0',
                     'dfagent_supernode_lookups_total{result="miss"} 3.0',
                     "dfagent_supernode_announces_total 5.0",
                     "dfagent_supernode_chunks 5.0",
                     'dfagent_supernode_peers{state="registered"} 1.0',
                     'dfagent_supernode_requests_total{code="400",endpoint="lookup"} 1.0',
                     'dfagent_supernode_request_seconds_count{endpoint="lookup"} 2.0'):
            assert line in text, line

    run(go())


def test_store_down_gives_503_and_not_ready() -> None:
    store = RedisPeerStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)

    async def go() -> None:
        async with serving(store=store) as (_, http):
            async with http.get("/readyz") as resp:
                assert resp.status == 503
            async with http.get("/healthz") as resp:
                assert resp.status == 200
            status, data = await call(http, "POST", "/api/v1/lookup", {"digests": [D]})
            assert (status, data["error"]["code"]) == (503, "store_unavailable")
            async with http.get("/metrics") as resp:  # the scrape survives a dead store
                assert resp.status == 200
                assert "dfagent_supernode_store_errors_total 1.0" in await resp.text()

    run(go())


@pytest.mark.parametrize("path", ["/api/v1/peers/a/announce", "/api/v1/peers/a/withdraw"])
def test_duplicate_digests_are_collapsed(path: str) -> None:
    async def go() -> None:
        async with serving() as (_, http):
            await call(http, "PUT", "/api/v1/peers/a", register_body())
            if path.endswith("withdraw"):
                await call(http, "POST", "/api/v1/peers/a/announce", {"digests": [D]})
            status, data = await call(http, "POST", path, {"digests": [D] * 5})
            assert status == 200 and next(iter(data.values())) == 1

    run(go())


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = _self_signed(tmp_path)
    cfg = replace(BASE, tls=TlsConfig(cert=cert, key=key), token=TOKEN)

    async def go() -> None:
        sn = await start_supernode(cfg, sweeper=False)
        try:
            assert sn.url.startswith("https://127.0.0.1:")
            trusted = ssl.create_default_context(cafile=str(cert))
            async with SupernodeClient([sn.url], token=TOKEN, ssl=trusted, timeout=5) as c:
                await c.register(peer("a"))
                await c.announce("a", [D])
                assert [p.id for p in (await c.lookup([D]))[D]] == ["a"]
            # Without trusting the certificate the connection is refused: no silent downgrade.
            async with SupernodeClient([sn.url], token=TOKEN, timeout=5) as c:
                with pytest.raises(SupernodeUnavailable, match=r"[Cc]ertificate"):
                    await c.lookup([D])
        finally:
            await sn.close()

    run(go())


def test_tls_unloadable_is_config_error(tmp_path: Path) -> None:
    (tmp_path / "bad.crt").write_text("not a certificate")
    cfg = replace(BASE, tls=TlsConfig(cert=tmp_path / "bad.crt", key=tmp_path / "bad.key"))
    with pytest.raises(ConfigError, match=r"^tls\.cert: cannot load"):
        run(start_supernode(cfg))
