"""FsMetrics, the metrics endpoint, the Unix-socket status API and its stdlib client."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import stat
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nydusfs.errors import NydusfsError
from nydusfs.fs.api import api_socket_path, make_app, start_api
from nydusfs.fs.model import FsObserver
from nydusfs.metrics import (
    METRIC_NAMES,
    FsMetrics,
    cache_gauges,
    dragonfly_gauges,
    prefetch_gauges,
    start_metrics_server,
)
from nydusfs.status import format_status, query_status

pytestmark = pytest.mark.timeout(30)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples_of(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(m: FsMetrics) -> Samples:
    return samples_of(generate_latest(m.registry).decode())


def names_in(text: str) -> set[str]:
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
    return names


def test_is_an_fs_observer() -> None:
    obs: FsObserver = FsMetrics()  # mypy checks the Protocol
    obs.cache_miss()


def test_counts_per_observer_call() -> None:
    m = FsMetrics()
    m.read_done(0.002, 4096, True)
    m.read_done(0.5, 100, True)
    m.read_done(0.01, 0, False)
    m.chunk_fetched("localfs", 1000)
    m.chunk_fetched("localfs", 500)
    m.chunk_fetched("registry", 7)
    for kind in ("memory", "memory", "disk", "inflight"):
        m.cache_hit(kind)
    m.cache_miss()
    m.cache_miss()
    m.verification_failure("backend")
    m.verification_failure("cache")
    m.verification_failure("cache")
    s = scrape(m)
    assert s[("nydusfs_read_seconds_count", (("outcome", "ok"),))] == 2
    assert s[("nydusfs_read_seconds_sum", (("outcome", "ok"),))] == pytest.approx(0.502)
    assert s[("nydusfs_read_seconds_count", (("outcome", "error"),))] == 1
    assert s[("nydusfs_read_seconds_bucket", (("le", "0.0025"), ("outcome", "ok")))] == 1
    assert s[("nydusfs_read_bytes_total", ())] == 4196
    assert s[("nydusfs_chunks_fetched_total", (("backend", "localfs"),))] == 2
    assert s[("nydusfs_chunks_fetched_total", (("backend", "registry"),))] == 1
    assert s[("nydusfs_fetched_bytes_total", (("backend", "localfs"),))] == 1500
    assert s[("nydusfs_fetched_bytes_total", (("backend", "registry"),))] == 7
    assert s[("nydusfs_cache_hits_total", (("kind", "memory"),))] == 2
    assert s[("nydusfs_cache_hits_total", (("kind", "disk"),))] == 1
    assert s[("nydusfs_cache_hits_total", (("kind", "inflight"),))] == 1
    assert s[("nydusfs_cache_misses_total", ())] == 2
    assert s[("nydusfs_verification_failures_total", (("where", "backend"),))] == 1
    assert s[("nydusfs_verification_failures_total", (("where", "cache"),))] == 2


def test_own_registry_so_mounts_do_not_clash() -> None:
    a, b = FsMetrics(), FsMetrics()
    a.cache_miss()
    assert scrape(a)[("nydusfs_cache_misses_total", ())] == 1
    assert scrape(b)[("nydusfs_cache_misses_total", ())] == 0


def test_zero_series_exist_before_events() -> None:
    s = scrape(FsMetrics(backends=["localfs"]))
    assert s[("nydusfs_cache_hits_total", (("kind", "disk"),))] == 0
    assert s[("nydusfs_verification_failures_total", (("where", "cache"),))] == 0
    assert s[("nydusfs_chunks_fetched_total", (("backend", "localfs"),))] == 0
    assert s[("nydusfs_read_seconds_count", (("outcome", "error"),))] == 0


def test_gauge_sources_read_at_scrape_time() -> None:
    m = FsMetrics()
    snap: dict[str, object] = {
        "state": "running",
        "total_chunks": 40,
        "done_chunks": 10,
        "total_bytes": 4000,
        "done_bytes": 1000,
        "failed_chunks": 1,
    }
    m.add_gauge_source(lambda: prefetch_gauges(snap))
    m.add_gauge_source(
        lambda: cache_gauges(
            {"bytes": 123, "chunks": 3, "evictions": 2, "errors": 1, "bytes_stored": 500, "x": 9},
            quota=1000,
        )
    )
    s = scrape(m)
    assert s[("nydusfs_prefetch_chunks", (("state", "done"),))] == 10
    assert s[("nydusfs_prefetch_chunks", (("state", "total"),))] == 40
    assert s[("nydusfs_prefetch_chunks", (("state", "failed"),))] == 1
    assert s[("nydusfs_prefetch_bytes", (("state", "done"),))] == 1000
    assert s[("nydusfs_prefetch_bytes", (("state", "total"),))] == 4000
    assert s[("nydusfs_cache_used_bytes", ())] == 123
    assert s[("nydusfs_cache_quota_bytes", ())] == 1000
    assert s[("nydusfs_cache_chunks", ())] == 3
    assert s[("nydusfs_cache_evictions_total", ())] == 2
    assert s[("nydusfs_cache_errors_total", ())] == 1
    assert s[("nydusfs_cache_written_bytes_total", ())] == 500
    snap["done_chunks"] = 40  # live: the next scrape sees the new value
    assert scrape(m)[("nydusfs_prefetch_chunks", (("state", "done"),))] == 40


def test_bad_gauge_sources_do_not_break_the_scrape() -> None:
    m = FsMetrics()

    def broken() -> dict[str, float]:
        raise RuntimeError("boom")

    m.add_gauge_source(broken)
    m.add_gauge_source(lambda: {"not_a_nydusfs_metric": 1.0, "nydusfs_cache_chunks": 5.0})
    m.add_gauge_source(lambda: {"nydusfs_cache_used_bytes{state=x}": 1.0})  # wrong label
    m.cache_miss()
    s = scrape(m)
    assert s[("nydusfs_cache_chunks", ())] == 5
    assert s[("nydusfs_cache_misses_total", ())] == 1
    assert not any(name.startswith("not_a") for name, _ in s)
    assert ("nydusfs_cache_used_bytes", (("state", "x"),)) not in s


def test_every_metric_name_appears_and_all_are_nydusfs() -> None:
    m = FsMetrics()
    m.chunk_fetched("localfs", 1)
    m.add_gauge_source(
        lambda: {
            **prefetch_gauges({"done_chunks": 1, "total_chunks": 2}),
            **cache_gauges(
                {"bytes": 1, "chunks": 3, "evictions": 4, "errors": 0, "bytes_stored": 5}, 2
            ),
            **dragonfly_gauges({"agent_chunks": 7, "fallback_chunks": 2, "fallbacks": 1,
                                "agent_errors": 1, "socket": "/run/x.sock"}),
        }
    )
    text = generate_latest(m.registry).decode()
    present = names_in(text)
    missing = [n for n in METRIC_NAMES if n not in present]
    assert not missing
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert name.startswith("nydusfs_")
    # Nothing exported that is not listed (histogram/counter suffixes aside).
    suffixes = ("_bucket", "_sum", "_count", "_created")
    for name in present:
        base = next((name[: -len(x)] for x in suffixes if name.endswith(x)), name)
        assert name in METRIC_NAMES or base in METRIC_NAMES or f"{base}_total" in METRIC_NAMES


def test_metrics_http_server() -> None:
    m = FsMetrics()
    m.chunk_fetched("localfs", 42)
    server = start_metrics_server(m, "127.0.0.1", 0)
    try:
        assert server.port > 0
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
            text = resp.read().decode()
    finally:
        server.close()
    assert samples_of(text)[("nydusfs_fetched_bytes_total", (("backend", "localfs"),))] == 42
    assert "nydusfs_read_seconds_bucket" in text
    # Closed: the port is free again and nothing answers.
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)
    server.close()  # idempotent


def test_api_socket_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run" / "nydusfs"
    p = api_socket_path(tmp_path / "mnt", run_dir=run)
    digest = hashlib.sha256(os.fsencode(tmp_path / "mnt")).hexdigest()[:16]
    assert p == run / f"{digest}.sock"
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    # Relative and dotted spellings of the same mountpoint share one socket.
    monkeypatch.chdir(tmp_path)
    assert api_socket_path(Path("mnt"), run_dir=run) == p
    assert api_socket_path(Path("x/../mnt"), run_dir=run) == p
    assert api_socket_path(tmp_path / "other", run_dir=run) != p
    assert len(api_socket_path(Path("/"), run_dir=run).name) == len("0123456789abcdef.sock")


STATUS: dict[str, object] = {
    "image": "/images/demo/bootstrap",
    "mountpoint": "/mnt/demo",
    "pid": 1234,
    "backend": "localfs",
    "reads": {"reads": 5, "bytes_read": 10240, "chunk_hits": 3},
    "prefetch": {
        "state": "running",
        "total_chunks": 8,
        "done_chunks": 2,
        "total_bytes": 8 << 20,
        "done_bytes": 2 << 20,
        "failed_chunks": 0,
    },
    "cache": {"used_bytes": 4096, "chunks": 1},
}


def test_api_round_trip_over_a_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"

    async def main() -> None:
        # A stale socket file (nobody listening) from a crashed daemon is replaced.
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(sock))
        stale.close()
        assert sock.exists()

        server = await start_api(sock, lambda: dict(STATUS, path=tmp_path))
        try:
            assert stat.S_ISSOCK(sock.lstat().st_mode)
            assert stat.S_IMODE(sock.lstat().st_mode) == 0o600
            got = await asyncio.wait_for(
                asyncio.to_thread(query_status, tmp_path / "mnt", 5, socket_path=sock), 10
            )
            assert got == dict(STATUS, path=str(tmp_path))
            # A second daemon for the same socket is refused while the first one serves.
            with pytest.raises(NydusfsError, match="another nydusfs daemon"):
                await start_api(sock, dict)
            assert sock.exists()
        finally:
            await server.close()
        assert not sock.exists()

    asyncio.run(main())


def test_api_refuses_to_replace_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    path.write_text("precious")

    async def main() -> None:
        with pytest.raises(NydusfsError, match="not a socket"):
            await start_api(path, dict)

    asyncio.run(main())
    assert path.read_text() == "precious"


def test_healthz_and_status_routes(tmp_path: Path) -> None:
    from aiohttp import ClientSession, UnixConnector, web

    async def main() -> None:
        runner = web.AppRunner(make_app(lambda: {"pid": 1}))
        await runner.setup()
        sock = tmp_path / "h.sock"
        await web.UnixSite(runner, str(sock)).start()
        try:
            async with ClientSession(connector=UnixConnector(path=str(sock))) as session:
                async with session.get("http://x/healthz") as r:
                    assert r.status == 200
                    assert (await r.text()).strip() == "ok"
                async with session.get("http://x/api/v1/status") as r:
                    assert await r.json() == {"pid": 1}
                async with session.get("http://x/nope") as r:
                    assert r.status == 404
        finally:
            await runner.cleanup()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_query_status_without_a_daemon(tmp_path: Path) -> None:
    with pytest.raises(NydusfsError, match=r"no nydusfs daemon for .*mnt \(is it mounted\?\)"):
        query_status(tmp_path / "mnt", 1, socket_path=tmp_path / "missing.sock")
    # A socket file nobody listens on reads the same way.
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(dead))
    s.close()
    with pytest.raises(NydusfsError, match="is it mounted"):
        query_status(tmp_path / "mnt", 1, socket_path=dead)


def test_query_status_default_path_without_a_daemon(tmp_path: Path) -> None:
    with pytest.raises(NydusfsError, match="is it mounted"):
        query_status(tmp_path / "never-mounted", 1)


def test_format_status() -> None:
    text = format_status(STATUS)
    lines = text.splitlines()
    assert lines[:4] == [
        "image: /images/demo/bootstrap",
        "mountpoint: /mnt/demo",
        "pid: 1234",
        "backend: localfs",
    ]
    assert "prefetch: running, 2/8 chunks (25.0%), 2.0 MiB/8.0 MiB, 0 failed" in lines
    assert "  bytes_read: 10240 (10.0 KiB)" in lines
    assert "cache:" in lines
    assert format_status({"prefetch": {"state": "done", "total_chunks": 0}}) == (
        "prefetch: done, 0/0 chunks (100.0%)"
    )
    assert "0/0 chunks (0.0%)" in format_status({"prefetch": {"state": "idle"}})


def test_dragonfly_gauges_name_origins() -> None:
    m = FsMetrics(backends=["dragonfly"])
    m.add_gauge_source(lambda: dragonfly_gauges({"agent_chunks": 7, "fallback_chunks": 2,
                                                 "fallbacks": 1, "agent_errors": 3,
                                                 "deliver": "path"}))
    s = scrape(m)
    assert s[("nydusfs_dragonfly_chunks_total", (("origin", "agent"),))] == 7
    assert s[("nydusfs_dragonfly_chunks_total", (("origin", "source"),))] == 2
    assert s[("nydusfs_dragonfly_fallbacks_total", ())] == 1
    assert s[("nydusfs_dragonfly_agent_errors_total", ())] == 3
