"""``backend: dragonfly``: config, reads through a real agent, and every way back to the source.

The agent is a real ``dfagent`` peer (in this process, on its own Unix socket; no supernode, so
it fetches from the image's source itself); the image is a real ``nydusfs build`` output read
through ``ImageFS``, so the requests are the ones a mount sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from dfagent.peer.agent import RunningPeer, start_peer
from dfagent.peer.config import PeerConfig
from nydusfs.config import BackendConfig, DragonflyConfig, HostPort, parse_config
from nydusfs.format.reader import Bootstrap
from nydusfs.fs.model import ImageFS
from nydusfs.storage import create_backend, dragonfly
from nydusfs.storage.dragonfly import DragonflyBackend

from .helpers import run

MiB = 1 << 20


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """A built image (64 KiB chunks) and its files' contents."""
    tmp = tmp_path_factory.mktemp("dfimage")
    src = tmp / "src"
    (src / "d").mkdir(parents=True)
    files = {"d/big": os.urandom(MiB + 777), "small": b"small file\n",
             "d/text": b"text " * 50_000}
    for name, data in files.items():
        (src / name).write_bytes(data)
    out = tmp / "img"
    proc = subprocess.run([sys.executable, "-m", "nydusfs.cli", "build", str(src), "-o", str(out),
                           "--chunk-size", "64K"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return out, files


def test_config_forms_and_defaults(tmp_path: Path) -> None:
    cfg = parse_config({"backend": "dragonfly"}, base_dir=tmp_path)
    assert cfg.backend.dragonfly == DragonflyConfig()
    assert str(cfg.backend.dragonfly.socket) == "/run/dfagent/dfagent.sock"
    assert cfg.backend.source_type == "localfs" and cfg.cache_enabled is False
    cfg = parse_config({"backend": {"type": "dragonfly", "dragonfly": {
        "socket": "agent.sock", "fallback": "registry", "timeout": "2s"},
        "registry": {"host": "r:5000", "repository": "a/b"}},
        "cache": {"enabled": True}}, base_dir=tmp_path)
    assert cfg.backend.dragonfly.socket == tmp_path / "agent.sock"
    assert cfg.backend.dragonfly.timeout == 2.0 and cfg.backend.source_type == "registry"
    assert cfg.cache_enabled is True  # asked for explicitly
    # nydusfs mount REF fills backend.registry: the fallback follows it
    assert BackendConfig(type="dragonfly", registry=parse_config(
        {"backend": {"type": "registry", "registry": {"host": "h", "repository": "r"}}},
        base_dir=tmp_path).backend.registry).source_type == "registry"


async def _agent(tmp: Path, socket: str) -> RunningPeer:
    """A real ``dfagent peer`` with no supernode (a caching proxy to the sources): its local
    API on ``tmp / socket``, its store in ``tmp / "data"``."""
    return await start_peer(PeerConfig(listen=HostPort("127.0.0.1", 0), socket=tmp / socket,
                                       data_dir=tmp / "data"))


def _fs(image: Path, socket: Path, **df: object) -> ImageFS:
    cfg = parse_config({"backend": {"type": "dragonfly",
                                    "dragonfly": {"socket": str(socket), **df}}},
                       base_dir=image)
    backend = create_backend(cfg.backend, image_dir=image)
    assert backend.per_chunk  # the wrappers say what the backend wants
    return ImageFS(Bootstrap.open(image / "bootstrap"), backend)


def _dragonfly(fs: ImageFS) -> DragonflyBackend:
    inner = fs.backend
    while not isinstance(inner, DragonflyBackend):
        inner = inner.inner  # type: ignore[attr-defined]
    return inner


async def _read(fs: ImageFS, name: str) -> bytes:
    ino = 1
    for part in name.split("/"):
        ino = fs.lookup(ino, part.encode()).ino
    return await fs.read(ino, 0, 4 * MiB)


def test_reads_through_the_agent_and_back_to_source_when_it_dies(
        image: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    img, files = image

    async def go() -> None:
        peer = await _agent(tmp_path, "a.sock")
        try:
            fs = _fs(img, peer.socket)
            df = _dragonfly(fs)
            for name, data in files.items():
                assert await _read(fs, name) == data
            n = len(list(fs.boot.chunks()))
            assert df.counters.agent_chunks == n and df.counters.fallback_chunks == 0
            assert len(peer.store) == n  # the agent's store is the node's cache
            assert peer.metrics.delivered_by["source"] == n

            # A chunk file gone bad in the agent's store: verified here, asked again with
            # refetch, the agent drops its copy and fetches it anew.
            victim = sorted(peer.store.digests())[0]
            path = peer.store.path_of(victim)
            raw = path.read_bytes()
            path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))  # always a change
            fs2 = _fs(img, peer.socket)
            rec = fs2.boot.find_chunk(bytes.fromhex(victim))
            assert rec is not None
            assert (await fs2.chunks([rec]))[0]
            df2 = _dragonfly(fs2)
            assert df2.counters.verification_failures == 1 and df2.counters.refetches == 1
            assert df2.counters.agent_chunks == 1 and df2.counters.fallback_chunks == 0
            assert peer.store.stats().corrupt == 1
            await fs2.backend.close()
        finally:
            await peer.close()
        # The agent is gone: the same mount keeps reading, from the image's own blobs.
        fs3 = _fs(img, peer.socket, retry_after="1h")
        for name, data in files.items():
            assert await _read(fs3, name) == data
        df3 = _dragonfly(fs3)
        assert df3.counters.fallbacks == 1  # one failed connect, then left alone
        assert df3.counters.agent_chunks == 0 and df3.counters.fallback_chunks > 0
        await fs3.backend.close()
        await fs.backend.close()

    run(go())


def test_requests_without_chunk_identity_go_to_the_source(
        image: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    img, _ = image
    blob = next((img / "blobs").iterdir())
    be = create_backend(BackendConfig(type="dragonfly", dragonfly=DragonflyConfig(
        socket=tmp_path / "nobody.sock")), image_dir=img)
    got = run(be.read(blob.name, 10, 100))
    assert got == blob.read_bytes()[10:110]
    run(be.close())


@contextlib.asynccontextmanager
async def _mute_agent(sock: Path) -> AsyncIterator[None]:
    """A Unix socket that reads each request and never answers, as a hung agent does."""
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        await asyncio.sleep(3600)

    server = await asyncio.start_unix_server(mute, path=str(sock))
    try:
        yield
    finally:
        server.close()


def test_agent_that_never_answers_times_out_to_the_source(
        image: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    img, files = image
    sock = tmp_path / "mute.sock"

    async def go() -> None:
        async with _mute_agent(sock):
            fs = _fs(img, sock, timeout="200ms")
            assert await _read(fs, "small") == files["small"]
            assert _dragonfly(fs).counters.fallbacks == 1
            await fs.backend.close()

    run(go())


def test_a_hung_agent_is_found_by_a_health_check_long_before_the_timeout(
        image: tuple[Path, dict[str, bytes]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent that accepts connections but answers nothing (not even ``/healthz``) is hung:
    the batch goes to the source after the first health check, not after ``timeout``, and the
    agent is left alone like an unreachable one."""
    img, files = image
    sock = tmp_path / "hung.sock"
    monkeypatch.setattr(dragonfly, "PROBE_AFTER", 0.05)
    monkeypatch.setattr(dragonfly, "PROBE_TIMEOUT", 0.05)

    async def go() -> None:
        async with _mute_agent(sock):
            fs = _fs(img, sock, timeout="1h", retry_after="1h")
            async with asyncio.timeout(60):  # far below the hour of ``timeout``
                assert await _read(fs, "small") == files["small"]
                assert await _read(fs, "d/text") == files["d/text"]
            df = _dragonfly(fs)
            assert df.counters.fallbacks == 1  # then left alone: not asked again
            assert df.counters.agent_chunks == 0 and df.counters.fallback_chunks > 1
            await fs.backend.close()

    run(go())


def test_a_busy_agent_that_is_alive_is_waited_for(
        image: tuple[Path, dict[str, bytes]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A real agent behind a proxy that holds its answer until the backend has checked twice
    that the agent is alive (as under load, when a batch waits on busy peers): the batch is
    not read from the source."""
    img, files = image
    monkeypatch.setattr(dragonfly, "PROBE_AFTER", 0.05)
    front = tmp_path / "front.sock"

    async def go() -> None:
        peer = await _agent(tmp_path, "agent.sock")
        probes = 0
        probed_twice = asyncio.Event()

        async def healthz(request: web.Request) -> web.Response:
            nonlocal probes
            probes += 1
            if probes >= 2:
                probed_twice.set()
            return web.Response(text="ok\n")

        async def chunks(request: web.Request) -> web.Response:
            body = await request.read()
            async with asyncio.timeout(30):
                await probed_twice.wait()
            conn = aiohttp.UnixConnector(path=str(peer.socket))
            async with aiohttp.ClientSession(connector=conn) as http, \
                    http.post("http://dfagent/api/v1/chunks", data=body,
                              headers={"Content-Type": "application/json"}) as resp:
                return web.Response(status=resp.status, body=await resp.read(),
                                    content_type=resp.content_type)

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_post("/api/v1/chunks", chunks)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.UnixSite(runner, str(front)).start()
        try:
            fs = _fs(img, front, timeout="1h")
            assert await _read(fs, "small") == files["small"]
            df = _dragonfly(fs)
            assert probes >= 2
            assert df.counters.fallbacks == 0 and df.counters.fallback_chunks == 0
            assert df.counters.agent_chunks >= 1
            await fs.backend.close()
        finally:
            await runner.cleanup()
            await peer.close()

    run(go())


def test_a_full_prefetch_warms_the_agent_without_reading_here(
        image: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    """``prefetch: {all: true}`` over dragonfly asks the agent to hold every chunk (its store
    is the node's cache) and reads none of them in the mount; later reads come from the agent's
    store, verified here. With the agent dead, the prefetch reads the chunks instead."""
    from nydusfs.fs.prefetch import Prefetcher

    img, files = image

    async def go() -> None:
        peer = await _agent(tmp_path, "a.sock")
        try:
            fs = _fs(img, peer.socket)
            df = _dragonfly(fs)
            n = len(list(fs.boot.chunks()))
            pf = Prefetcher(fs, all=True, bandwidth=0, concurrency=2)
            assert pf.warms and not pf.rotate  # blob order: nodes share the horizon
            await pf.run()
            assert pf.state == "done" and pf.done_chunks == n and pf.failed_chunks == 0
            assert df.counters.warmed_chunks == n and df.counters.agent_chunks == 0
            assert fs.backend.bytes_read == 0 and fs.backend.warmed == n  # type: ignore[attr-defined]
            assert len(peer.store) == n and peer.metrics.delivered_by["source"] == n
            for name, data in files.items():  # now from the agent's store, verified here
                assert await _read(fs, name) == data
            assert peer.metrics.delivered_by["source"] == n  # nothing fetched twice
            await fs.backend.close()
        finally:
            await peer.close()
        fs = _fs(img, peer.socket, retry_after="1h")  # the agent is gone
        pf = Prefetcher(fs, all=True, bandwidth=0, concurrency=2)
        await pf.run()
        assert pf.state == "done" and pf.done_chunks == len(list(fs.boot.chunks()))
        df = _dragonfly(fs)
        assert df.counters.warmed_chunks == 0 and df.counters.fallback_chunks > 0
        await fs.backend.close()

    run(go())
