"""The ``registry`` backend: the storage contract against a real docker-registry, and batching.

The conformance tests from ``test_conformance`` are imported and run here over the registry
backend (bare, and inside the ``create_backend`` stack), with the same blobs pushed to a real
registry; then ``read_many`` coalescing is checked by counting the GETs the registry served.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from registry_server import RegistryServer

from nydusfs.config import BackendConfig, RegistryConfig
from nydusfs.errors import AuthError, ConfigError, UnavailableError
from nydusfs.oci.client import ClientOptions, RegistryClient
from nydusfs.storage import Backend, CountingBackend, RangeRequest, create_backend
from nydusfs.storage.registry import RegistryBackend

from .helpers import make_blobs, run
from .test_conformance import (  # noqa: F401 (collected here, run over the registry backend)
    test_bad_blob_names_are_not_found,
    test_close_is_idempotent_and_final,
    test_exact_bytes,
    test_many_concurrent_reads,
    test_missing_blob_is_not_found,
    test_ranges_at_edges,
    test_ranges_outside_the_blob_are_not_found,
    test_read_many_errors,
    test_read_many_keeps_request_order,
    test_stream_many_hands_each_range_its_bytes,
)

Blobs = dict[str, bytes]
REPOSITORY = "conformance/blobs"


async def _push(server: RegistryServer, repository: str, blobs: Blobs) -> None:
    opts = ClientOptions()
    if server.auth is not None:
        user, password = server.credentials()
        opts = ClientOptions(username=user, password=password)
    async with RegistryClient(server.host, opts) as c:
        for name, data in blobs.items():
            await c.push_blob(repository, f"sha256:{name}", data)


@pytest.fixture(scope="module")
def blobs() -> Blobs:
    return make_blobs()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, blobs: Blobs) -> Iterator[RegistryServer]:
    srv = RegistryServer(tmp_path_factory.mktemp("registry-backend"))
    srv.start()
    try:
        run(_push(srv, REPOSITORY, blobs))
        yield srv
    finally:
        srv.stop()


def _bare(server: RegistryServer) -> Backend:
    return RegistryBackend(server.host, REPOSITORY)


def _stack(server: RegistryServer) -> Backend:
    cfg = BackendConfig(type="registry", attempts=2,
                        registry=RegistryConfig(host=server.host, repository=REPOSITORY))
    return create_backend(cfg, image_dir=None)


IMPLEMENTATIONS: dict[str, Callable[[RegistryServer], Backend]] = {
    "registry": _bare,
    "stack-registry": _stack,
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def backend(request: pytest.FixtureRequest, server: RegistryServer) -> Iterator[Backend]:
    be = IMPLEMENTATIONS[request.param](server)
    yield be
    run(be.close())


def _big(blobs: Blobs) -> tuple[str, bytes]:
    return max(blobs.items(), key=lambda kv: len(kv[1]))


def _blob_gets(server: RegistryServer, since: int) -> list[int]:
    """Statuses of the blob GETs the registry served after access-log line ``since``."""
    return [e.status for e in server.access_log()[since:]
            if e.method == "GET" and "/blobs/" in e.path]


def test_read_many_coalesces_neighbours(server: RegistryServer, blobs: Blobs) -> None:
    name, _ = _big(blobs)
    small = next(k for k, v in blobs.items() if 0 < len(v) < 1000)
    reqs = [RangeRequest(name, i * 4096, 4096) for i in range(10)]  # one run: 0..40959
    reqs += [RangeRequest(name, 2000, 100)]  # inside it
    reqs += [RangeRequest(name, 100_000, 10), RangeRequest(name, 100_010, 5)]  # a second run
    reqs += [RangeRequest(small, 0, 5)]  # another blob
    be = RegistryBackend(server.host, REPOSITORY)

    async def go() -> list[bytes]:
        try:
            return await be.read_many(reqs)
        finally:
            await be.close()

    before = len(server.access_log())
    got = run(go())
    assert got == [blobs[r.blob][r.offset:r.offset + r.size] for r in reqs]
    assert _blob_gets(server, before) == [206, 206, 206]
    assert be.gets == 3 and be.client.requests_sent == 1 + 3  # GET /v2/ first
    assert be.client.bytes_downloaded == 40960 + 15 + 5


def test_merge_gap_trades_bytes_for_round_trips(server: RegistryServer, blobs: Blobs) -> None:
    name, data = _big(blobs)
    reqs = [RangeRequest(name, i * 1000, 100) for i in range(20)]  # 900-byte holes

    async def count(gap: int) -> tuple[int, int]:
        be = RegistryBackend(server.host, REPOSITORY, merge_gap=gap)
        try:
            got = await be.read_many(reqs)
            assert got == [data[r.offset:r.offset + r.size] for r in reqs]
            return be.gets, be.client.bytes_downloaded
        finally:
            await be.close()

    assert run(count(0)) == (20, 2000)
    assert run(count(1000)) == (1, 19 * 1000 + 100)


def test_backend_used_from_successive_event_loops(server: RegistryServer, blobs: Blobs) -> None:
    name, data = _big(blobs)
    be = RegistryBackend(server.host, REPOSITORY)
    for i in range(3):  # each asyncio.run is a new loop: the backend gets a new session
        assert run(be.read(name, i, 10)) == data[i:i + 10]
    run(be.close())
    with pytest.raises(UnavailableError, match="closed"):
        run(be.read(name, 0, 1))


def test_registry_with_token_auth(tmp_path: Path, blobs: Blobs) -> None:
    name, data = _big(blobs)
    with RegistryServer(tmp_path / "reg", auth="token") as srv:
        run(_push(srv, "secret/blobs", blobs))
        user, password = srv.credentials()

        def stack(username: str, pw: str) -> CountingBackend:
            return create_backend(BackendConfig(type="registry", registry=RegistryConfig(
                host=srv.host, repository="secret/blobs", username=username, password=pw)),
                image_dir=None)

        async def read(be: Backend) -> bytes:
            try:
                parts = await asyncio.gather(*(be.read(name, o, 1000)
                                               for o in range(0, 50_000, 1000)))
                return b"".join(parts)
            finally:
                await be.close()

        assert run(read(stack(user, password))) == data[:50_000]
        assert srv.issuer is not None and len(srv.issuer.requests) <= 3  # token shared
        with pytest.raises(AuthError, match="alice"):
            run(read(stack(user, "wrong")))


@pytest.mark.parametrize("registry, message", [
    (RegistryConfig(), r"^backend.registry.host: required"),
    (RegistryConfig(host="127.0.0.1:1"), r"^backend.registry.repository: required"),
    (RegistryConfig(host="127.0.0.1:1", repository="Bad/Name"),
     r"^backend.registry.repository: invalid repository name 'Bad/Name'"),
])
def test_config_errors_name_the_field(registry: RegistryConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_backend(BackendConfig(type="registry", registry=registry), image_dir=None)


def test_stack_and_options_from_config(tmp_path: Path) -> None:
    cfg = BackendConfig(type="registry", timeout=7, attempts=3, registry=RegistryConfig(
        host="reg.example:5000", repository="a/b", plain_http=True, ca_file=tmp_path / "ca.pem",
        username="u", password="p"))
    be = create_backend(cfg, image_dir=None)
    assert be.name == "registry"
    inner = be.inner.inner.inner  # type: ignore[attr-defined]
    assert isinstance(inner, RegistryBackend)
    opts = inner.options
    assert (opts.timeout, opts.attempts, opts.plain_http, opts.ca_file) == (
        7, 1, True, tmp_path / "ca.pem")  # retries are the stack's job
    assert inner.client.base == "http://reg.example:5000"
    assert inner.client.auth.credentials is not None
    assert inner.client.auth.credentials.username == "u"
