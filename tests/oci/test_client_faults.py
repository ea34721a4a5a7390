"""Faults a real registry cannot be made to produce, injected by a proxy in front of one.

:class:`FaultProxy` is a small aiohttp server on loopback that forwards to the real
docker-registry (keeping ``Host``, so the registry's ``Location`` headers point back at the
proxy) unless one of its fault rules answers first: 5xx bursts, 429 with ``Retry-After``, a
connection cut mid-blob, a corrupted byte, a redirect to a second server that records the
headers it gets, a stall, an oversized manifest, TLS with a self-signed certificate. Client
and proxy share one event loop; the client's ``sleep`` is injected, so nothing waits for
backoff and the delays it chose are asserted exactly.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import itertools
import os
import random
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from registry_server import RegistryServer

from nydusfs.errors import (
    FormatError,
    IntegrityError,
    RegistryError,
    UnavailableError,
)
from nydusfs.oci import ClientOptions, RegistryClient

from .conftest import options_for, push_image, run, sha

Fault = Callable[[web.Request], Awaitable[web.StreamResponse | None]]
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-authorization",
        "content-length"}
_names = itertools.count()


def repo() -> str:
    return f"faults/r{next(_names)}-{os.getpid()}"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FaultProxy:
    """Forwards to ``upstream`` unless a rule in ``faults`` answers (first non-None wins)."""

    upstream: str
    ssl_context: ssl.SSLContext | None = None
    faults: list[Fault] = field(default_factory=list)
    log: list[Seen] = field(default_factory=list)
    host: str = ""
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> FaultProxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        port = self._runner.addresses[0][1]
        self.host = f"127.0.0.1:{port}"
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.log.append(Seen(request.method, request.path_qs, dict(request.headers)))
        for fault in self.faults:
            answer = await fault(request)
            if answer is not None:
                return answer
        return await self.forward(request)

    async def fetch(self, request: web.Request, *, drop_range: bool = False
                    ) -> tuple[int, dict[str, str], bytes]:
        """The upstream's answer to ``request``: (status, headers, body)."""
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in _HOP and not (drop_range and k.lower() == "range")}
        if self.ssl_context is not None:
            headers["X-Forwarded-Proto"] = "https"
        async with self._session.request(request.method, self.upstream + request.path_qs,
                                         headers=headers, data=await request.read(),
                                         allow_redirects=False) as up:
            body = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            if request.method == "HEAD" and "Content-Length" in up.headers:
                out["Content-Length"] = up.headers["Content-Length"]
            return up.status, out, body

    async def forward(self, request: web.Request) -> web.StreamResponse:
        status, headers, body = await self.fetch(request)
        return web.Response(status=status, headers=headers,
                            body=None if request.method == "HEAD" else body)

    def count(self, method: str, pattern: str) -> int:
        return sum(1 for s in self.log if s.method == method and re.search(pattern, s.path))


def is_blob_get(request: web.Request) -> bool:
    return request.method == "GET" and "/blobs/sha256:" in request.path


def is_manifest_get(request: web.Request) -> bool:
    return request.method == "GET" and "/manifests/" in request.path


def failing(times: int, status: int, when: Callable[[web.Request], bool],
            headers: dict[str, str] | None = None) -> Fault:
    left = [times]

    async def fault(request: web.Request) -> web.StreamResponse | None:
        if left[0] > 0 and when(request):
            left[0] -= 1
            return web.Response(status=status, headers=headers,
                                text='{"errors":[{"code":"UNAVAILABLE","message":"injected"}]}')
        return None
    return fault


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def seed(server: RegistryServer, r: str, layers: list[bytes]) -> None:
    async with RegistryClient(server.host, options_for(server)) as c:
        await push_image(c, r, "v1", layers)


def proxied(server: RegistryServer) -> FaultProxy:
    return FaultProxy(f"http://{server.host}")


# -- retries ---------------------------------------------------------------------------------

def test_500s_then_recovery(registry: RegistryServer) -> None:
    r = repo()

    async def go() -> None:
        await seed(registry, r, [b"layer"])
        async with proxied(registry) as proxy:
            proxy.faults.append(failing(2, 500, is_manifest_get))
            proxy.faults.append(failing(1, 503, is_blob_get))
            sleep = RecordingSleep()
            async with RegistryClient(proxy.host, sleep=sleep, rng=lambda: 1.0) as c:
                m = await c.get_manifest(r, "v1")
                assert await c.get_blob(r, m.layers[0].digest) == b"layer"
                assert c.retries == 3
            assert proxy.count("GET", "/manifests/v1") == 3
            # exponential backoff (jitter pinned to its maximum): 0.25, then 0.5; fresh per call
            assert sleep.delays == [0.25, 0.5, 0.25]
    run(go())


def test_429_honours_retry_after(registry: RegistryServer) -> None:
    r = repo()

    async def go() -> None:
        await seed(registry, r, [b"layer"])
        async with proxied(registry) as proxy:
            proxy.faults.append(failing(1, 429, is_manifest_get, {"Retry-After": "7"}))
            proxy.faults.append(failing(1, 503, is_blob_get, {"Retry-After": "600"}))
            sleep = RecordingSleep()
            async with RegistryClient(proxy.host, sleep=sleep) as c:
                m = await c.get_manifest(r, "v1")
                await c.get_blob(r, m.layers[0].digest)
            assert sleep.delays == [7.0, 60.0]  # as asked, but capped at max_retry_after
    run(go())


def test_persistent_failure_is_unavailable(registry: RegistryServer) -> None:
    async def go() -> None:
        async with proxied(registry) as proxy:
            proxy.faults.append(failing(100, 502, is_manifest_get))
            sleep = RecordingSleep()
            async with RegistryClient(proxy.host, ClientOptions(attempts=3), sleep=sleep) as c:
                with pytest.raises(UnavailableError, match=r"HTTP 502 UNAVAILABLE: injected "
                                                           r"\(gave up after 3 attempts\)"):
                    await c.get_manifest("a/b", "v1")
            assert proxy.count("GET", "/manifests/") == 3 and len(sleep.delays) == 2
            proxy.faults.append(failing(100, 503, lambda request: True))
            async with RegistryClient(proxy.host, ClientOptions(attempts=2),
                                      sleep=RecordingSleep()) as c:  # even GET /v2/ fails
                with pytest.raises(UnavailableError, match=r"GET /v2/: HTTP 503"):
                    await c.get_manifest("a/b", "v1")
        # nothing listening at all: connection refused, retried, then unavailable
        async with RegistryClient(proxy.host, ClientOptions(attempts=2),
                                  sleep=RecordingSleep()) as c:
            with pytest.raises(UnavailableError, match="gave up after 2 attempts"):
                await c.blob_exists("a/b", sha(b""))
    run(go())


def test_stalled_response_times_out_and_is_retried(registry: RegistryServer) -> None:
    r = repo()
    stalls = [1]

    async def go() -> None:
        await seed(registry, r, [b"layer"])
        release = asyncio.Event()

        async def stall(request: web.Request) -> web.StreamResponse | None:
            if stalls[0] and is_manifest_get(request):
                stalls[0] -= 1
                # far beyond the client's timeout; released once the client is done
                await asyncio.wait_for(release.wait(), 30)
            return None

        async with proxied(registry) as proxy:
            proxy.faults.append(stall)
            async with RegistryClient(proxy.host, ClientOptions(timeout=0.5),
                                      sleep=RecordingSleep()) as c:
                assert (await c.get_manifest(r, "v1")).layers
                assert c.retries == 1
            release.set()
    run(go())


# -- interrupted and corrupted downloads -----------------------------------------------------

def cut_after(nbytes: int, times: int = 1) -> Callable[[FaultProxy], Fault]:
    """Send the blob's headers (full Content-Length) and ``nbytes`` of body, then hang up."""
    def make(proxy: FaultProxy) -> Fault:
        left = [times]

        async def fault(request: web.Request) -> web.StreamResponse | None:
            if not (left[0] and is_blob_get(request)):
                return None
            left[0] -= 1
            status, headers, body = await proxy.fetch(request)
            resp = web.StreamResponse(status=status, headers=headers)
            resp.content_length = len(body)
            await resp.prepare(request)
            await resp.write(body[:nbytes])
            assert request.transport is not None
            request.transport.close()
            return resp
        return fault
    return make


def test_cut_mid_blob_resumes_with_range(registry: RegistryServer, tmp_path: Path) -> None:
    data = blob(1_000_000, 1)
    r = repo()

    async def go() -> None:
        await seed(registry, r, [data])
        async with proxied(registry) as proxy:
            proxy.faults.append(cut_after(300_000, times=2)(proxy))
            async with RegistryClient(proxy.host, sleep=RecordingSleep()) as c:
                dest = tmp_path / "blob"
                assert await c.download_blob(r, sha(data), dest) == len(data)
                assert dest.read_bytes() == data
                ranges = [s.headers.get("Range") for s in proxy.log
                          if s.method == "GET" and sha(data) in s.path]
                # first cut at 300000, the resumed request cut after 300000 more
                assert ranges == [None, "bytes=300000-", "bytes=600000-"]
                proxy.faults.append(cut_after(123_456)(proxy))
                assert await c.get_blob(r, sha(data)) == data
                assert c.bytes_downloaded == 2 * len(data)
            assert list(tmp_path.iterdir()) == [dest]
    run(go())


def test_resume_ignored_by_server_starts_over(registry: RegistryServer, tmp_path: Path) -> None:
    data = blob(700_000, 2)
    r = repo()

    async def go() -> None:
        await seed(registry, r, [data])
        async with proxied(registry) as proxy:
            async def no_ranges(request: web.Request) -> web.StreamResponse | None:
                if is_blob_get(request) and "Range" in request.headers:
                    status, headers, body = await proxy.fetch(request, drop_range=True)
                    return web.Response(status=status, headers=headers, body=body)
                return None
            proxy.faults += [cut_after(250_000)(proxy), no_ranges]
            async with RegistryClient(proxy.host, sleep=RecordingSleep()) as c:
                assert await c.download_blob(r, sha(data), tmp_path / "b") == len(data)
            assert (tmp_path / "b").read_bytes() == data
    run(go())


def test_cut_every_time_gives_up_cleanly(registry: RegistryServer, tmp_path: Path) -> None:
    data = blob(200_000, 3)
    r = repo()

    async def go() -> None:
        await seed(registry, r, [data])
        async with proxied(registry) as proxy:
            proxy.faults.append(cut_after(0, times=1000)(proxy))
            async with RegistryClient(proxy.host, ClientOptions(attempts=3),
                                      sleep=RecordingSleep()) as c:
                with pytest.raises(UnavailableError, match="gave up after 3 failed attempts"):
                    await c.download_blob(r, sha(data), tmp_path / "b")
        assert list(tmp_path.iterdir()) == []
    run(go())


def test_bytes_not_matching_the_digest(registry: RegistryServer, tmp_path: Path) -> None:
    data = blob(100_000, 4)
    r = repo()

    async def go() -> None:
        await seed(registry, r, [data])
        async with proxied(registry) as proxy:
            async def corrupt(request: web.Request) -> web.StreamResponse | None:
                if not is_blob_get(request):
                    return None
                status, headers, body = await proxy.fetch(request)
                flipped = bytes([body[0] ^ 0x80]) + body[1:] if body else body
                return web.Response(status=status, headers=headers, body=flipped)
            proxy.faults.append(corrupt)
            async with RegistryClient(proxy.host) as c:
                with pytest.raises(IntegrityError, match=f"{sha(data)}: content hashes to"):
                    await c.download_blob(r, sha(data), tmp_path / "b")
                with pytest.raises(IntegrityError):
                    await c.get_blob(r, sha(data))
        assert list(tmp_path.iterdir()) == []
    run(go())


# -- manifests that are not what they claim ----------------------------------------------------

@pytest.mark.parametrize("body, content_type, message", [
    (b"<html>login required</html>", "text/html", "not valid JSON"),
    (b"{" + b" " * (5 << 20) + b"}", "application/json", "more than the 4194304"),
    (b'{"schemaVersion": 1, "name": "x", "fsLayers": []}',
     "application/vnd.docker.distribution.manifest.v1+prettyjws", "schema 1"),
])
def test_bad_manifest_answers(registry: RegistryServer, body: bytes, content_type: str,
                              message: str) -> None:
    async def go() -> None:
        async with proxied(registry) as proxy:
            async def answer(request: web.Request) -> web.StreamResponse | None:
                if not is_manifest_get(request):
                    return None
                resp = web.StreamResponse(headers={"Content-Type": content_type})
                resp.enable_chunked_encoding()  # no Content-Length: the limit must hold anyway
                await resp.prepare(request)
                await resp.write(body)
                await resp.write_eof()
                return resp
            proxy.faults.append(answer)
            async with RegistryClient(proxy.host) as c:
                with pytest.raises(FormatError, match=message):
                    await c.get_manifest("a/b", "v1")
    run(go())


def test_manifest_fetched_by_digest_is_verified(registry: RegistryServer) -> None:
    r = repo()

    async def go() -> None:
        await seed(registry, r, [b"one"])
        async with RegistryClient(registry.host) as c:
            other = await push_image(c, r, "v2", [b"two"])
            digest = (await c.get_manifest(r, "v1")).digest
        async with proxied(registry) as proxy:
            async def swap(request: web.Request) -> web.StreamResponse | None:
                if is_manifest_get(request) and digest in request.path:
                    status, headers, _ = await proxy.fetch(request)
                    assert status == 200
                    async with aiohttp.ClientSession() as s, \
                            s.get(f"{proxy.upstream}/v2/{r}/manifests/{other}",
                                  headers={"Accept": headers["Content-Type"]}) as up:
                        return web.Response(headers=headers, body=await up.read())
                return None
            proxy.faults.append(swap)
            async with RegistryClient(proxy.host) as c:
                with pytest.raises(IntegrityError, match=f"hashes to {other}"):
                    await c.get_manifest(r, digest)
    run(go())


# -- redirects --------------------------------------------------------------------------------

def test_redirect_to_another_host_drops_authorization(basic_registry: RegistryServer) -> None:
    data = blob(300_000, 5)
    r = repo()
    objects: dict[str, bytes] = {}
    seen: list[dict[str, str]] = []

    async def serve_object(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        body = objects[request.match_info["digest"]]
        rng = request.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d+)", rng)
            assert m
            lo, hi = int(m[1]), min(int(m[2]), len(body) - 1)
            return web.Response(status=206, body=body[lo:hi + 1], headers={
                "Content-Range": f"bytes {lo}-{hi}/{len(body)}"})
        return web.Response(body=body)

    async def go() -> None:
        await seed(basic_registry, r, [data])
        store = web.Application()
        store.router.add_get("/objects/{digest}", serve_object)
        runner = web.AppRunner(store, handle_signals=False, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        store_port = runner.addresses[0][1]
        try:
            async with FaultProxy(f"http://{basic_registry.host}") as proxy:
                async def redirect(request: web.Request) -> web.StreamResponse | None:
                    if not is_blob_get(request):
                        return None
                    status, headers, body = await proxy.fetch(request, drop_range=True)
                    if status != 200:  # e.g. 401 before the client authenticated
                        return web.Response(status=status, headers=headers, body=body)
                    digest = request.path.rsplit("/", 1)[1]
                    objects[digest] = body
                    return web.Response(status=307, headers={
                        "Location": f"http://127.0.0.1:{store_port}/objects/{digest}?sig=x"})
                proxy.faults.append(redirect)
                async with RegistryClient(proxy.host, options_for(basic_registry)) as c:
                    m = await c.get_manifest(r, "v1")
                    assert await c.get_blob(r, m.layers[0].digest) == data
                    assert await c.read_blob_range(r, sha(data), 1000, 10) == data[1000:1010]
                # the registry got the credentials; the object store never did
                assert any("Authorization" in s.headers for s in proxy.log if s.method == "GET")
                assert len(seen) == 2  # the layer, then a range of it
                assert all("Authorization" not in h for h in seen)
                assert seen[-1]["Range"] == "bytes=1000-1009"
        finally:
            await runner.cleanup()
    run(go())


def test_same_host_redirect_keeps_authorization(basic_registry: RegistryServer) -> None:
    r = repo()

    async def go() -> None:
        await seed(basic_registry, r, [b"payload"])
        async with proxied(basic_registry) as proxy:
            async def bounce(request: web.Request) -> web.StreamResponse | None:
                if is_blob_get(request) and "bounced" not in request.query:
                    return web.Response(status=302, headers={
                        "Location": f"{request.path}?bounced=1"})
                return None
            proxy.faults.append(bounce)
            async with RegistryClient(proxy.host, options_for(basic_registry)) as c:
                m = await c.get_manifest(r, "v1")
                assert await c.get_blob(r, m.layers[0].digest) == b"payload"
            bounced = [s for s in proxy.log if "bounced=1" in s.path]
            assert bounced and all("Authorization" in s.headers for s in bounced)
    run(go())


# -- TLS --------------------------------------------------------------------------------------

def self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx, cert_file


def test_tls_with_ca_file_or_insecure(registry: RegistryServer, tmp_path: Path) -> None:
    server_ctx, cert = self_signed(tmp_path)
    r = repo()

    async def go() -> None:
        async with FaultProxy(f"http://{registry.host}", ssl_context=server_ctx) as proxy:
            tls: dict[str, Any] = {"plain_http": False}
            async with RegistryClient(proxy.host, ClientOptions(**tls, ca_file=cert)) as c:
                assert c.base.startswith("https://")
                digest = await push_image(c, r, "v1", [b"over tls"])
                assert (await c.get_manifest(r, "v1")).digest == digest
            async with RegistryClient(proxy.host, ClientOptions(**tls)) as c:
                with pytest.raises(RegistryError, match=r"TLS .* failed .*ca_file"):
                    await c.get_manifest(r, "v1")
                assert c.retries == 0  # a certificate problem is not retried
            async with RegistryClient(proxy.host, ClientOptions(
                    **tls, insecure_skip_verify=True)) as c:
                assert (await c.get_manifest(r, "v1")).digest == digest
    run(go())
