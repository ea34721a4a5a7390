"""The upload server over a real loopback socket: limits, the token, and nothing but chunks.

The agent runs in this process (``start_peer``), so the test can see its upload slots; the
requests are real HTTP over TCP.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import pytest
import yarl

from dfagent.peer.agent import RunningPeer, start_peer
from dfagent.peer.config import PeerConfig, UploadConfig
from dfagent.peer.upload import LIMITS
from nydusfs.config import HostPort
from nydusfs.format import chunkfile

from .helpers import chunk, run

TOKEN = "upload-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _peer(tmp: Path, **kw: object) -> RunningPeer:
    cfg = PeerConfig(listen=HostPort("127.0.0.1", 0), socket=tmp / "a.sock",
                     data_dir=tmp / "data", token=TOKEN, **kw)  # type: ignore[arg-type]
    return await start_peer(cfg)


def test_saturated_server_answers_429_at_once(tmp_path: Path) -> None:
    async def go() -> None:
        peer = await _peer(tmp_path, upload=UploadConfig(max_concurrent=1, rate=32 << 10))
        c = chunk(512 << 10)  # ~16 s at 32 KiB/s: the first upload stays in progress
        await peer.store.put(c.digest, c.file)
        limits = peer.runners[0].app[LIMITS]
        try:
            async with aiohttp.ClientSession(headers=AUTH) as http:
                async def slow() -> None:
                    async with http.get(f"{peer.url}/chunks/{c.digest}") as resp:
                        await resp.read()

                first = asyncio.create_task(slow())
                for _ in range(500):  # bounded: until the first upload holds the slot
                    if limits.active == 1:
                        break
                    await asyncio.sleep(0.01)
                assert limits.active == 1
                async with http.get(f"{peer.url}/chunks/{c.digest}") as resp:
                    assert resp.status == 429 and resp.headers["Retry-After"] == "1"
                async with http.post(f"{peer.url}/chunks", json={"digests": [c.digest]}) as resp:
                    assert resp.status == 429
                first.cancel()
            assert "dfagent_peer_upload_rejections_total{reason=\"busy\"} 2.0" in \
                peer.metrics_text().decode()
        finally:
            await peer.close()

    run(go())


@pytest.mark.parametrize("batch", [False, True], ids=["get", "batch"])
def test_a_requester_that_goes_away_mid_upload_is_not_an_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, batch: bool) -> None:
    """A requester that hangs up while its chunk is being sent (the cancelled loser of a
    hedge, a peer that stopped) frees the upload slot and is logged at debug level, not as
    an ERROR with a traceback: it is how the fetch path works, not a fault of this node."""
    async def go() -> None:
        peer = await _peer(tmp_path, upload=UploadConfig(rate=64 << 10))
        c = chunk(1 << 20)  # ~16 s at 64 KiB/s: still being sent when the requester leaves
        await peer.store.put(c.digest, c.file)
        limits = peer.runners[0].app[LIMITS]
        try:
            async with aiohttp.ClientSession(headers=AUTH) as http:
                if batch:
                    resp = await http.post(f"{peer.url}/chunks", json={"digests": [c.digest]})
                else:
                    resp = await http.get(f"{peer.url}/chunks/{c.digest}")
                assert resp.status == 200
                await resp.content.readexactly(64 << 10)
                resp.close()  # hang up mid-body
            for _ in range(500):  # bounded: 10 s for the server to notice
                if limits.active == 0:
                    break
                await asyncio.sleep(0.02)
            assert limits.active == 0
        finally:
            await peer.close()

    with caplog.at_level(logging.DEBUG):
        run(go())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("went away" in r.getMessage() for r in caplog.records)


def test_token_and_only_digest_named_chunks(tmp_path: Path) -> None:
    async def go() -> None:
        peer = await _peer(tmp_path)
        c, missing = chunk(3000), chunk(10)
        await peer.store.put(c.digest, c.file)
        secret = b"TOP-SECRET-NOT-A-CHUNK"
        (tmp_path / "data" / "secret").write_bytes(secret)
        (tmp_path / "secret").write_bytes(secret)
        (tmp_path / "data" / "chunks" / c.digest[:2] / "secret").write_bytes(secret)
        try:
            async with aiohttp.ClientSession() as http:
                url = f"{peer.url}/chunks/{c.digest}"
                async with http.get(url) as resp:
                    assert resp.status == 401
                async with http.get(url, headers={"Authorization": "Bearer wrong-token-xxxxxxxx"}
                                    ) as resp:
                    assert resp.status == 401
                async with http.get(f"{peer.url}/healthz") as resp:
                    assert resp.status == 200
                async with http.get(url, headers=AUTH) as resp:
                    assert resp.status == 200 and await resp.read() == c.file
                async with http.get(f"{peer.url}/chunks/{missing.digest}", headers=AUTH) as resp:
                    assert resp.status == 404
                async with http.post(f"{peer.url}/chunks", headers=AUTH,
                                     json={"digests": [c.digest, missing.digest]}) as resp:
                    frames = list(chunkfile.iter_frames(await resp.read()))
                assert [(f.digest.hex(), f.status) for f in frames] == [
                    (c.digest, chunkfile.FRAME_FOUND), (missing.digest, chunkfile.FRAME_NOT_FOUND)]
                assert bytes(frames[0].body) == c.file
                bads: list[dict[str, object]] = [
                    {"digests": ["../secret"]}, {"digests": []}, {"digests": "x"},
                    {"digests": [c.digest] * 300}]
                for bad in bads:
                    async with http.post(f"{peer.url}/chunks", headers=AUTH, json=bad) as resp:
                        assert resp.status == 400
                for path in ("/chunks/../secret", "/chunks/%2e%2e/secret",
                             "/chunks/..%2fsecret", f"/chunks/{c.digest[:2]}/secret",
                             f"/chunks/{c.digest}/../secret", f"/chunks/{c.digest.upper()}",
                             "/data/secret", "/secret", "/chunks/%2e%2e%2f%2e%2e%2fsecret",
                             "/chunks/" + "../" * 6 + "etc/passwd", "/", "/chunks"):
                    async with http.get(yarl.URL(peer.url + path, encoded=True),
                                        headers=AUTH) as resp:
                        body = await resp.read()
                        assert resp.status in (404, 405), (path, resp.status)
                        assert secret not in body and b"root:" not in body, path
        finally:
            await peer.close()

    run(go())
