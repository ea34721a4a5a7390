"""The OCI distribution client: manifests and blobs, pulled and pushed, one registry host each.

This is the only code in nydusfs that speaks the distribution API (``/v2/...``). Callers get
value types (:class:`~nydusfs.oci.manifest.Manifest`) and bytes that have been checked against
their digests; they never see aiohttp. Behaviour, as docker/containerd/skopeo do it:

- **Transport.** ``http://`` for registries on loopback (``localhost``, ``127.0.0.0/8``,
  ``::1``) or with ``plain_http``; ``https://`` otherwise, verified against the system CAs plus
  ``ca_file``, or not at all with ``insecure_skip_verify``. ``docker.io`` is
  ``registry-1.docker.io``. No ``Accept-Encoding`` (bytes are hashed as served), no proxy from
  the environment.
- **Auth.** See :mod:`nydusfs.oci.auth`: anonymous until a 401 says otherwise, then Basic or
  Bearer tokens cached per scope, refreshed once on a 401.
- **Redirects** (registries send blob reads to object storage) are followed by hand, at most
  10 hops; the registry's ``Authorization`` goes only to the registry's own scheme+host+port,
  never to the host redirected to (a presigned URL carries its own authority).
- **Retries.** 408, 429, 5xx and connection errors/timeouts are retried ``attempts`` times in
  all, with exponential backoff and full jitter, or after ``Retry-After`` when the registry
  says (capped at ``max_retry_after``). A blob download cut mid-body resumes with ``Range``.
  Then :class:`~nydusfs.errors.UnavailableError`.
- **Timeouts.** Each attempt: ``timeout`` for connecting and for every socket read; requests
  with small bodies (manifests, HEAD, tokens, ranges) are also bounded by ``timeout`` in all.
- **Sizes.** Manifests over 4 MiB, token responses over 1 MiB, error bodies over 64 KiB are
  not read; :meth:`RegistryClient.get_blob` refuses blobs over ``max_size``.

Errors: 404 -> :class:`~nydusfs.errors.NotFoundError`; 401/403 after the credentials there are
-> :class:`~nydusfs.errors.AuthError`; other 4xx -> :class:`~nydusfs.errors.RegistryError`
(status and the registry's error code in the message); bytes not matching their digest ->
:class:`~nydusfs.errors.IntegrityError` (nothing kept); malformed JSON ->
:class:`~nydusfs.errors.FormatError`; bad arguments (repository, tag) ->
:class:`~nydusfs.errors.ConfigError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import hashlib
import ipaddress
import json
import os
import random
import re
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import aiohttp
from multidict import CIMultiDictProxy

from nydusfs import __version__
from nydusfs.errors import (
    AuthError,
    ConfigError,
    FormatError,
    IntegrityError,
    NotFoundError,
    RegistryError,
    SourceError,
    UnavailableError,
)
from nydusfs.oci.auth import MAX_TOKEN_RESPONSE, Authenticator, find_credentials
from nydusfs.oci.manifest import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_SIZE,
    Index,
    Manifest,
    Platform,
    check_digest,
    compute_digest,
    parse_manifest_or_index,
)

if TYPE_CHECKING:
    from nydusfs.config import RegistryConfig

__all__ = ["DOCKER_HUB_HOST", "ClientOptions", "RegistryClient", "is_loopback_host"]

T = TypeVar("T")

DOCKER_HUB_HOST = "registry-1.docker.io"
MAX_ERROR_BODY = 64 << 10
MAX_REDIRECTS = 10
_READ_CHUNK = 256 << 10  # bytes per read from a response body
# A response's bytes aiohttp buffers before it stops reading the socket (twice this). Blob
# ranges streamed to the P2P agent are consumed between its other work; a bigger buffer keeps
# the registry's TCP flow going while the event loop is busy, instead of closing its window.
_READ_BUFSIZE = 1 << 20
_FLUSH = 4 << 20  # download buffer written to disk (and hashed) in a worker thread at this size
_FILE_CHUNK = 1 << 20  # bytes per read from a file being uploaded
_MANIFEST_ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
_REPOSITORY = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)"
                         r"[a-z0-9]+)*)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, ``127.x.y.z`` and ``[::1]``, with or without a port."""
    name = host
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """How to reach and authenticate to a registry; defaults are docker's."""

    plain_http: bool | None = None  # None: http for loopback hosts, https otherwise
    insecure_skip_verify: bool = False
    ca_file: Path | None = None
    auth_file: Path | None = None  # docker config.json; None: the usual places (see auth)
    username: str | None = None  # explicit credentials beat the environment and auth_file
    password: str | None = None
    timeout: float = 30.0  # seconds per request attempt (connect, each read, small bodies)
    attempts: int = 5  # tries in all for 408/429/5xx/connection errors
    retry_base_delay: float = 0.25  # seconds; doubled per retry, full jitter
    retry_max_delay: float = 8.0
    max_retry_after: float = 60.0  # longest Retry-After honoured
    chunk_size: int = 8 << 20  # blobs above this are uploaded in PATCH chunks of this size

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ConfigError(f"timeout: must be positive, got {self.timeout!r}")
        if self.attempts < 1:
            raise ConfigError(f"attempts: must be at least 1, got {self.attempts!r}")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size: must be positive, got {self.chunk_size!r}")

    @classmethod
    def from_registry_config(cls, cfg: RegistryConfig, *, timeout: float,
                             attempts: int) -> ClientOptions:
        """The options ``backend.registry`` describes."""
        return cls(plain_http=cfg.plain_http, insecure_skip_verify=cfg.insecure_skip_verify,
                   ca_file=cfg.ca_file, auth_file=cfg.auth_file, username=cfg.username,
                   password=cfg.password, timeout=timeout, attempts=attempts)


class _Transient(Exception):
    """An attempt failed in a way a later attempt may not (429, 5xx, connection, timeout)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _clean(text: str, limit: int = 200) -> str:
    """Registry-supplied text made safe for a one-line message."""
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return _clean(f"{type(exc).__name__}: {text}" if str(exc) else text)


_NETWORK_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)


class _Pieces:
    """Where a response body goes as it arrives: kept and joined at the end, or handed to a
    ``sink(position, bytes)`` piece by piece and not kept (a streaming reader has them)."""

    __slots__ = ("_buf", "_sink")

    def __init__(self, sink: Callable[[int, bytes], None] | None) -> None:
        self._sink = sink
        self._buf = bytearray()

    def __call__(self, pos: int, data: bytes) -> None:
        if self._sink is not None:
            self._sink(pos, data)
        else:
            self._buf += data

    def data(self) -> bytes:
        """What was kept: the body, or ``b""`` when it went to a sink."""
        return bytes(self._buf)


class RegistryClient:
    """One registry host: one aiohttp session (created on first use), tokens cached per scope.

    Use ``async with RegistryClient(host, options) as client`` (or call :meth:`close`). The
    session belongs to the event loop that first used the client. Counters for tests and
    progress: ``bytes_downloaded`` (response bodies of manifests and blobs), ``bytes_uploaded``
    (blob and manifest bodies sent, retries included), ``requests_sent``, ``retries``,
    ``blobs_uploaded``, ``blobs_skipped`` (already there), ``blobs_mounted``.
    """

    def __init__(self, registry: str, options: ClientOptions | None = None, *,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                 rng: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.options = options or ClientOptions()
        host = DOCKER_HUB_HOST if registry in ("docker.io", "index.docker.io") else registry
        plain = self.options.plain_http
        if plain is None:
            plain = is_loopback_host(host)
        self.scheme = "http" if plain else "https"
        self.base = f"{self.scheme}://{host}"
        self._origin = self._origin_of(self.base)
        self._sleep = sleep
        self._rng = rng
        o = self.options
        credentials = find_credentials(registry, username=o.username, password=o.password,
                                       auth_file=o.auth_file)
        self.auth = Authenticator(registry, credentials, self._fetch_token,
                                  realm_ok=self._realm_ok, clock=clock)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._probed = False  # GET /v2/ done: the auth scheme is known
        self._probe_lock = asyncio.Lock()
        self.bytes_downloaded = 0
        self.bytes_uploaded = 0
        self.requests_sent = 0
        self.retries = 0
        self.blobs_uploaded = 0
        self.blobs_skipped = 0
        self.blobs_mounted = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session; idempotent. A closed client raises ``UnavailableError``."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _ssl(self) -> ssl.SSLContext | bool:
        if self.options.insecure_skip_verify:
            return False
        if self.options.ca_file is None:
            return default_ssl_context()
        ctx = ssl.create_default_context()
        if self.options.ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=str(self.options.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"ca_file: cannot load {self.options.ca_file}: {exc}") from exc
        return ctx

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise UnavailableError(f"{self.registry}: registry client is closed")
        if self._session is None:
            t = self.options.timeout
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl(), limit=64),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t),
                headers={"User-Agent": f"nydusfs/{__version__}",
                         "Accept-Encoding": "identity"},
                auto_decompress=False, trust_env=False, read_bufsize=_READ_BUFSIZE)
        return self._session

    # -- validation of arguments ----------------------------------------------------------------

    def _repo(self, repository: str) -> str:
        if not isinstance(repository, str) or not _REPOSITORY.fullmatch(repository):
            raise ConfigError(f"{repository!r}: invalid repository name (lowercase path "
                              "components such as library/python)")
        return repository

    @staticmethod
    def _digest(digest: str) -> str:
        return check_digest(digest, "digest")

    @staticmethod
    def _reference(reference: str) -> str:
        if isinstance(reference, str) and (_TAG.fullmatch(reference) or ":" in reference):
            if ":" in reference:
                check_digest(reference, "reference")
            return reference
        raise ConfigError(f"{reference!r}: invalid tag or digest")

    def _url(self, repository: str, kind: str, ref: str) -> str:
        return f"{self.base}/v2/{repository}/{kind}/{ref}"

    @staticmethod
    def _pull(repository: str) -> tuple[str, ...]:
        return (f"repository:{repository}:pull",)

    @staticmethod
    def _push(repository: str) -> tuple[str, ...]:
        return (f"repository:{repository}:pull,push",)

    # -- the request machinery ------------------------------------------------------------------

    @staticmethod
    def _origin_of(url: str) -> tuple[str, str, int | None]:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return parts.scheme, (parts.hostname or "").lower(), port

    def _realm_ok(self, realm: str) -> bool:
        parts = urlsplit(realm)
        if parts.scheme == "https":
            return True
        return parts.scheme == "http" and (self.options.plain_http is True
                                           or is_loopback_host(parts.netloc))

    def _delay(self, failures: int, retry_after: float | None) -> float:
        o = self.options
        if retry_after is not None:
            return min(retry_after, o.max_retry_after)
        cap = min(o.retry_max_delay, o.retry_base_delay * 2.0 ** (failures - 1))
        return float(self._rng() * cap)

    async def _retrying(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` until it does not raise ``_Transient``, at most ``attempts`` times."""
        last: _Transient | None = None
        for attempt in range(self.options.attempts):
            if last is not None:
                self.retries += 1
                await self._sleep(self._delay(attempt, last.retry_after))
            try:
                return await op()
            except _Transient as exc:
                last = exc
        assert last is not None
        raise UnavailableError(f"{what}: {last.reason} (gave up after "
                               f"{self.options.attempts} attempts)") from last

    async def _open(self, method: str, url: str, *, scopes: tuple[str, ...],
                    what: str, headers: dict[str, str] | None = None,
                    body: Callable[[], object] | None = None,
                    ok: Collection[int] = (200,)) -> aiohttp.ClientResponse:
        """One attempt: send (answering auth challenges, following redirects) and return the
        open response if its status is in ``ok``; the caller reads and releases it.

        Raises ``_Transient`` for what a later attempt may fix, our errors for the rest.
        """
        session = self._get_session()
        if not self._probed:
            await self._probe(session, what)
        auth_tries = 0
        hops = 0
        current = url
        to_registry = True
        while True:
            h = dict(headers or {})
            sent: str | None = None
            if to_registry:
                sent = await self.auth.authorization(scopes)
                if sent is not None:
                    h["Authorization"] = sent
            try:
                resp = await session.request(method, current, headers=h,
                                             data=body() if body is not None else None,
                                             allow_redirects=False)
            except aiohttp.ClientSSLError as exc:  # a certificate will not fix itself
                raise RegistryError(f"{what}: TLS with {urlsplit(current).netloc} failed "
                                    f"({_describe(exc)}); give the CA with ca_file, or "
                                    "insecure_skip_verify") from exc
            except _NETWORK_ERRORS as exc:
                raise _Transient(f"{method} {current}: {_describe(exc)}") from exc
            self.requests_sent += 1
            status = resp.status
            if status in ok:
                return resp
            if status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                location = resp.headers["Location"]
                resp.release()
                hops += 1
                if hops > MAX_REDIRECTS:
                    raise RegistryError(f"{what}: more than {MAX_REDIRECTS} redirects")
                current = urljoin(current, location)
                if urlsplit(current).scheme not in ("http", "https"):
                    raise RegistryError(f"{what}: redirect to a non-HTTP URL")
                to_registry = self._origin_of(current) == self._origin
                if status == 303 or (status in (301, 302) and method not in ("GET", "HEAD")):
                    method, body = "GET", None
                continue
            if status == 401 and to_registry and auth_tries < 2:
                challenge = resp.headers.get("WWW-Authenticate")
                resp.release()
                if await self.auth.unauthorized(challenge, scopes, sent):
                    auth_tries += 1
                    continue
                raise AuthError(f"{what}: HTTP 401 unauthorized with {self.auth.describe()}")
            await self._raise_for(resp, what, to_registry)

    async def _probe(self, session: aiohttp.ClientSession, what: str) -> None:
        """``GET /v2/`` once, before anything else, to learn how the registry authenticates.

        As docker does: concurrent first requests would otherwise each collect a 401 (and
        bodies would be sent twice); after the probe every request carries the right
        ``Authorization`` from the start.
        """
        async with self._probe_lock:
            if self._probed:
                return
            try:
                async with session.get(f"{self.base}/v2/", allow_redirects=False) as resp:
                    self.requests_sent += 1
                    if resp.status == 401:
                        await self.auth.unauthorized(resp.headers.get("WWW-Authenticate"), (),
                                                     None)
                    elif resp.status in (408, 429) or resp.status >= 500:
                        raise _Transient(f"{what}: GET /v2/: HTTP {resp.status}",
                                         _retry_after(resp.headers.get("Retry-After")))
            except aiohttp.ClientSSLError as exc:
                raise RegistryError(f"{what}: TLS with {self.registry} failed "
                                    f"({_describe(exc)}); give the CA with ca_file, or "
                                    "insecure_skip_verify") from exc
            except _NETWORK_ERRORS as exc:
                raise _Transient(f"{what}: GET /v2/: {_describe(exc)}") from exc
            self._probed = True

    async def _raise_for(self, resp: aiohttp.ClientResponse, what: str,
                         to_registry: bool) -> None:
        """Turn an unwanted response into the right error (always raises)."""
        status = resp.status
        code, message = "", ""
        try:
            if resp.content_length is None or resp.content_length <= MAX_ERROR_BODY:
                raw = await resp.content.read(MAX_ERROR_BODY)
                doc = json.loads(raw) if raw else None
                if isinstance(doc, dict) and isinstance(doc.get("errors"), list) and doc["errors"]:
                    first = doc["errors"][0]
                    if isinstance(first, dict):
                        code = _clean(str(first.get("code", "")), 40)
                        message = _clean(str(first.get("message", "")))
        except (ValueError, RecursionError, *_NETWORK_ERRORS):
            pass
        finally:
            resp.release()
        detail = f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}"
                                                                    if message else "")
        if status in (408, 429) or status >= 500:
            raise _Transient(f"{what}: {detail}", _retry_after(resp.headers.get("Retry-After")))
        if status == 404:
            raise NotFoundError(f"{what}: not found ({detail})")
        if status == 416:
            raise NotFoundError(f"{what}: range not satisfiable ({detail})")
        if status in (401, 403):
            who = self.auth.describe() if to_registry else "the redirect target's own URL"
            raise AuthError(f"{what}: {detail} (credentials tried: {who})")
        if code == "DIGEST_INVALID":
            raise IntegrityError(f"{what}: the registry says the content does not match its "
                                 f"digest ({detail})")
        raise RegistryError(f"{what}: {detail}")

    async def _read(self, resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
        """The whole body, at most ``limit`` bytes (``FormatError`` beyond)."""
        keep = _Pieces(None)
        await self._read_pieces(resp, limit, what, keep)
        return keep.data()

    async def _read_pieces(self, resp: aiohttp.ClientResponse, limit: int, what: str,
                           keep: _Pieces) -> int:
        """The whole body into ``keep`` as it arrives, at most ``limit`` bytes (``FormatError``
        beyond); the number of bytes."""
        if resp.content_length is not None and resp.content_length > limit:
            raise FormatError(f"{what}: {resp.content_length} bytes, more than the {limit} "
                              "allowed")
        got = 0
        try:
            async for chunk in resp.content.iter_chunked(_READ_CHUNK):
                if got + len(chunk) > limit:
                    raise FormatError(f"{what}: more than the {limit} bytes allowed")
                keep(got, chunk)
                got += len(chunk)
        except _NETWORK_ERRORS as exc:
            raise _Transient(f"{what}: reading the response: {_describe(exc)}") from exc
        return got

    async def _fetch(self, method: str, url: str, *, scopes: tuple[str, ...], what: str,
                     limit: int, headers: dict[str, str] | None = None,
                     body: Callable[[], object] | None = None, ok: Collection[int] = (200,),
                     count: bool = False) -> tuple[int, CIMultiDictProxy[str], bytes]:
        """A small request, retried as a whole: (status, headers, body)."""

        async def once() -> tuple[int, CIMultiDictProxy[str], bytes]:
            try:
                async with asyncio.timeout(self.options.timeout):
                    resp = await self._open(method, url, scopes=scopes, what=what,
                                            headers=headers, body=body, ok=ok)
                    try:
                        data = b"" if method == "HEAD" else await self._read(resp, limit, what)
                    finally:
                        resp.release()
            except TimeoutError as exc:
                raise _Transient(f"{what}: timed out after {self.options.timeout:g}s") from exc
            if count:
                self.bytes_downloaded += len(data)
            return resp.status, resp.headers, data

        return await self._retrying(what, once)

    async def _fetch_token(self, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        """GET a token (the Authenticator's transport): no registry auth, no redirects."""
        session = self._get_session()
        what = f"{self.registry}: token server"

        async def once() -> tuple[int, bytes]:
            try:
                async with asyncio.timeout(self.options.timeout):
                    resp = await session.get(url, headers=headers, allow_redirects=False)
                    self.requests_sent += 1
                    try:
                        if resp.status in (408, 429) or resp.status >= 500:
                            raise _Transient(f"{what}: HTTP {resp.status}",
                                             _retry_after(resp.headers.get("Retry-After")))
                        data = (await self._read(resp, MAX_TOKEN_RESPONSE, what)
                                if resp.status == 200 else b"")
                    finally:
                        resp.release()
            except TimeoutError as exc:
                raise _Transient(f"{what}: timed out after {self.options.timeout:g}s") from exc
            except aiohttp.ClientSSLError as exc:
                raise AuthError(f"{what}: TLS with {urlsplit(url).netloc} failed "
                                f"({_describe(exc)})") from exc
            except _NETWORK_ERRORS as exc:
                raise _Transient(f"{what}: {_describe(exc)}") from exc
            return resp.status, data

        return await self._retrying(what, once)

    # -- manifests ----------------------------------------------------------------------------

    async def get_manifest_or_index(self, repository: str, reference: str) -> Manifest | Index:
        """Whatever ``reference`` (tag or digest) names, parsed and verified (by digest when
        fetched by digest; a tag's bytes are hashed to give the digest)."""
        repo, ref = self._repo(repository), self._reference(reference)
        what = f"{self.registry}/{repo}:{ref}" if ":" not in ref else \
            f"{self.registry}/{repo}@{ref}"
        _, headers, raw = await self._fetch(
            "GET", self._url(repo, "manifests", ref), scopes=self._pull(repo), what=what,
            limit=MAX_MANIFEST_SIZE, headers={"Accept": _MANIFEST_ACCEPT}, count=True)
        content_type = headers.get("Content-Type", "").partition(";")[0].strip()
        digest = ref if ":" in ref else compute_digest(raw)
        return parse_manifest_or_index(raw, content_type, digest)

    async def get_manifest(self, repository: str, reference: str, *,
                           platform: str = "linux/amd64") -> Manifest:
        """The image manifest for ``reference``; an index is followed to ``platform``'s entry.

        ``NotFoundError`` if the tag/digest (or the platform) is unknown, ``FormatError`` if
        it is not an image, ``IntegrityError`` if bytes fetched by digest do not match it.
        """
        Platform.parse(platform)  # a bad --platform fails before any request
        got = await self.get_manifest_or_index(repository, reference)
        if isinstance(got, Manifest):
            return got
        entry = got.select(platform)
        inner = await self.get_manifest_or_index(repository, entry.digest)
        if isinstance(inner, Index):
            raise FormatError(f"index {got.digest}: entry for {platform} is itself an index "
                              f"({entry.digest}); nested indexes are not supported")
        if len(inner.raw) != entry.size:
            raise IntegrityError(f"manifest {entry.digest}: {len(inner.raw)} bytes, but the "
                                 f"index says {entry.size}")
        return inner

    async def put_manifest(self, repository: str, reference: str, body: bytes,
                           media_type: str) -> str:
        """Upload a manifest or index under ``reference`` (tag or digest); its digest.

        The body is validated first (:func:`parse_manifest_or_index`), so a malformed manifest
        is a ``FormatError`` here rather than a registry's terse 400.
        """
        repo, ref = self._repo(repository), self._reference(reference)
        digest = compute_digest(body)
        if ":" in ref and ref != digest:
            raise IntegrityError(f"manifest body hashes to {digest}, not {ref}")
        parse_manifest_or_index(body, media_type, digest)
        what = f"{self.registry}/{repo}: put manifest {ref}"
        _, headers, _ = await self._fetch(
            "PUT", self._url(repo, "manifests", ref), scopes=self._push(repo), what=what,
            limit=MAX_ERROR_BODY, headers={"Content-Type": media_type}, body=lambda: body,
            ok=(200, 201))
        self.bytes_uploaded += len(body)
        echoed = headers.get("Docker-Content-Digest")
        if echoed and echoed != digest:
            raise IntegrityError(f"{what}: registry stored it as {_clean(echoed, 80)}, not "
                                 f"{digest}")
        return digest

    # -- blobs: reading -----------------------------------------------------------------------

    async def blob_size(self, repository: str, digest: str) -> int:
        """The blob's size from a HEAD request; ``NotFoundError`` if it is not there."""
        repo, digest = self._repo(repository), self._digest(digest)
        what = f"{self.registry}/{repo}@{digest}"
        _, headers, _ = await self._fetch("HEAD", self._url(repo, "blobs", digest),
                                          scopes=self._pull(repo), what=what, limit=0)
        length = headers.get("Content-Length", "")
        if not length.isdigit():
            raise RegistryError(f"{what}: HEAD answered without a Content-Length")
        return int(length)

    async def blob_exists(self, repository: str, digest: str) -> bool:
        """Whether the registry has the blob in ``repository`` (HEAD)."""
        try:
            await self.blob_size(repository, digest)
        except NotFoundError:
            return False
        return True

    async def read_blob_range(self, repository: str, digest: str, offset: int, size: int, *,
                              sink: Callable[[int, bytes], None] | None = None) -> bytes:
        """Exactly ``size`` bytes of the blob from ``offset``; ``NotFoundError`` if the blob is
        missing or the range is not inside it (no digest check: the caller verifies chunks).

        ``sink``: also called with ``(position in the range, bytes)`` for each piece as it
        arrives (a retry starts again at 0); the bytes are then not kept, and ``b""`` is
        returned (a streaming reader has them already)."""
        repo, digest = self._repo(repository), self._digest(digest)
        what = f"{self.registry}/{repo}@{digest}[{offset}+{size}]"
        if offset < 0 or size < 0:
            raise NotFoundError(f"{what}: invalid range")
        if size == 0:
            if offset > await self.blob_size(repo, digest):
                raise NotFoundError(f"{what}: offset beyond the end of the blob")
            return b""
        end = offset + size - 1
        url = self._url(repo, "blobs", digest)

        async def once() -> bytes:
            try:
                async with asyncio.timeout(self.options.timeout):
                    resp = await self._open("GET", url, scopes=self._pull(repo), what=what,
                                            headers={"Range": f"bytes={offset}-{end}"},
                                            ok=(200, 206))
                    try:
                        return await self._read_range(resp, offset, size, what, sink)
                    finally:
                        resp.release()
            except TimeoutError as exc:
                raise _Transient(f"{what}: timed out after {self.options.timeout:g}s") from exc

        return await self._retrying(what, once)

    async def _read_range(self, resp: aiohttp.ClientResponse, offset: int, size: int,
                          what: str, sink: Callable[[int, bytes], None] | None) -> bytes:
        if resp.status == 206:
            m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
            if not m or int(m[1]) != offset:
                raise RegistryError(f"{what}: unexpected Content-Range "
                                    f"{_clean(resp.headers.get('Content-Range', ''), 80)!r}")
            if int(m[2]) != offset + size - 1:
                raise NotFoundError(f"{what}: range extends beyond the end of the blob "
                                    f"({_clean(m[0], 80)})")
            keep = _Pieces(sink)
            try:
                got = await self._read_pieces(resp, size, what, keep)
            except FormatError as exc:
                raise RegistryError(f"{what}: the registry sent more than the range") from exc
            self.bytes_downloaded += got
        else:  # 200: the server ignored Range; skip to the range within the whole body
            total = resp.content_length
            if total is not None and offset + size > total:
                raise NotFoundError(f"{what}: range extends beyond the end of the blob "
                                    f"({total} bytes)")
            got = 0
            pos = 0
            keep = _Pieces(sink)
            try:
                async for chunk in resp.content.iter_chunked(_READ_CHUNK):
                    self.bytes_downloaded += len(chunk)
                    lo, hi = max(offset - pos, 0), min(offset + size - pos, len(chunk))
                    if lo < hi:
                        keep(got, chunk[lo:hi])
                        got += hi - lo
                    pos += len(chunk)
                    if pos >= offset + size:
                        break
            except _NETWORK_ERRORS as exc:
                raise _Transient(f"{what}: reading the response: {_describe(exc)}") from exc
        if got != size:
            raise NotFoundError(f"{what}: got {got} bytes, the blob ends before "
                                f"{offset + size}")
        return keep.data()

    async def get_blob(self, repository: str, digest: str, *, max_size: int = 64 << 20) -> bytes:
        """The whole blob in memory (configs, bootstraps), verified against ``digest``.

        More than ``max_size`` bytes is a ``FormatError``; a mismatch ``IntegrityError``.
        """
        buf = bytearray()

        async def sink(data: bytes) -> None:
            buf.extend(data)

        async def reset() -> None:
            buf.clear()

        await self._stream_blob(repository, digest, sink, reset, max_size=max_size,
                                progress=None)
        return bytes(buf)

    async def download_blob(self, repository: str, digest: str, dest: Path, *,
                            progress: Callable[[int], None] | None = None) -> int:
        """Stream the blob to ``dest`` (temp file + rename), verified; return its size.

        A connection cut mid-body resumes with ``Range`` from the last byte received. On any
        error, nothing is left behind (no partial ``dest``, no temp file).
        """
        dest = Path(dest)
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part",
                                            dir=dest.parent)
        except OSError as exc:
            raise SourceError(f"{dest}: cannot create a file there: {exc}") from exc
        tmp = Path(tmp_name)
        f = os.fdopen(fd, "wb")

        async def sink(data: bytes) -> None:
            await asyncio.to_thread(f.write, data)

        async def reset() -> None:
            def truncate() -> None:
                f.seek(0)
                f.truncate()
            await asyncio.to_thread(truncate)

        try:
            try:
                size = await self._stream_blob(repository, digest, sink, reset, max_size=None,
                                               progress=progress)
                await asyncio.to_thread(f.close)
                os.replace(tmp, dest)
            except OSError as exc:
                raise SourceError(f"{dest}: cannot write: {exc}") from exc
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
        return size

    async def _stream_blob(self, repository: str, digest: str,
                           sink: Callable[[bytes], Awaitable[None]],
                           reset: Callable[[], Awaitable[None]], *, max_size: int | None,
                           progress: Callable[[int], None] | None) -> int:
        """GET the blob into ``sink`` in order, resuming by Range after a cut; verify digest.

        ``reset`` empties the sink when the server restarts from byte 0. Failures without
        progress are bounded by ``attempts``; resumptions after progress by ``4 * attempts``.
        """
        repo, digest = self._repo(repository), self._digest(digest)
        what = f"{self.registry}/{repo}@{digest}"
        url = self._url(repo, "blobs", digest)
        algo = digest.partition(":")[0]
        hasher = hashlib.new(algo)
        got = 0
        failures = 0
        resumes = 0
        pending = bytearray()

        async def flush() -> None:
            if pending:
                data = bytes(pending)
                pending.clear()
                await asyncio.to_thread(hasher.update, data)
                await sink(data)

        while True:
            before = got
            try:
                headers = {"Range": f"bytes={got}-"} if got else None
                resp = await self._open("GET", url, scopes=self._pull(repo), what=what,
                                        headers=headers, ok=(200, 206))
                try:
                    total: int | None = resp.content_length
                    if resp.status == 206:
                        m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
                        if not m or int(m[1]) != got:
                            raise _Transient(f"{what}: resumed at the wrong offset")
                        total = None if m[3] == "*" else int(m[3])
                    elif got:  # the server ignored Range: start over
                        got = 0
                        pending.clear()
                        hasher = hashlib.new(algo)
                        await reset()
                        before = 0
                    if max_size is not None and total is not None and total > max_size:
                        raise FormatError(f"{what}: {total} bytes, more than the {max_size} "
                                          "allowed")
                    try:
                        async for chunk in resp.content.iter_chunked(_READ_CHUNK):
                            got += len(chunk)
                            self.bytes_downloaded += len(chunk)
                            if max_size is not None and got > max_size:
                                raise FormatError(f"{what}: more than the {max_size} bytes "
                                                  "allowed")
                            pending += chunk
                            if progress is not None:
                                progress(len(chunk))
                            if len(pending) >= _FLUSH:
                                await flush()
                    except _NETWORK_ERRORS as exc:
                        raise _Transient(f"{what}: connection lost after {got} bytes: "
                                         f"{_describe(exc)}") from exc
                    if total is not None and got != total:
                        raise _Transient(f"{what}: body ended at {got} of {total} bytes")
                finally:
                    resp.release()
                await flush()
                break
            except _Transient as exc:
                await flush()
                if got > before:
                    failures, resumes = 1, resumes + 1
                else:
                    failures += 1
                if failures >= self.options.attempts or resumes > 4 * self.options.attempts:
                    raise UnavailableError(f"{exc.reason} (gave up after {failures} failed "
                                           f"attempts, {resumes} resumptions)") from exc
                self.retries += 1
                await self._sleep(self._delay(failures, exc.retry_after))
        actual = f"{algo}:{hasher.hexdigest()}"
        if actual != digest:
            raise IntegrityError(f"{what}: content hashes to {actual} ({got} bytes)")
        return got

    # -- blobs: writing -----------------------------------------------------------------------

    async def push_blob(self, repository: str, digest: str, source: Path | bytes, *,
                        mount_from: Sequence[str] = (),
                        progress: Callable[[int], None] | None = None) -> bool:
        """Make the blob exist in ``repository``; True if its bytes were uploaded.

        False when the registry already had it (HEAD) or mounted it from one of
        ``mount_from``'s repositories (same registry). Files stream from disk; blobs up to
        ``chunk_size`` go in one PUT, larger ones as PATCH chunks then a closing PUT. A failed
        upload starts over in a new session (up to ``attempts`` times). ``IntegrityError`` if
        the bytes do not hash to ``digest`` (checked locally for ``bytes``, by the registry for
        files).
        """
        repo, digest = self._repo(repository), self._digest(digest)
        what = f"{self.registry}/{repo}: push {digest}"
        if isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
            size = len(data)
            if compute_digest(data, digest.partition(":")[0]) != digest:
                raise IntegrityError(f"{what}: the bytes given hash to "
                                     f"{compute_digest(data)}")
            path: Path | None = None
        else:
            path, data = Path(source), b""
            try:
                size = path.stat().st_size
            except OSError as exc:
                raise SourceError(f"{path}: cannot read blob: {exc}") from exc
        if await self.blob_exists(repo, digest):
            self.blobs_skipped += 1
            return False
        for source_repo in mount_from:
            if source_repo != repo and await self.mount_blob(repo, digest, source_repo):
                return False
        location: str | None = None
        uploads = f"{self.base}/v2/{repo}/blobs/uploads/"

        async def upload() -> None:
            nonlocal location
            if location is None:
                _, headers, _ = await self._fetch("POST", uploads, scopes=self._push(repo),
                                                  what=what, limit=MAX_ERROR_BODY,
                                                  headers={"Content-Length": "0"}, ok=(202,))
                location = self._location(headers, what)
            try:
                await self._upload(repo, location, digest, path, data, size, progress, what)
            finally:
                location = None  # a retry needs a fresh session

        await self._retrying(what, upload)
        self.blobs_uploaded += 1
        return True

    async def mount_blob(self, repository: str, digest: str, from_repository: str) -> bool:
        """Ask the registry to mount blob ``digest`` of ``from_repository`` into ``repository``
        (``POST /v2/<repository>/blobs/uploads/?mount=<digest>&from=<from_repository>``, same
        registry); no bytes are sent.

        True when the registry answered 201 (the blob is now in ``repository``). False when it
        started an upload session instead (202: it does not have the blob there, or does not
        mount across repositories); that session is cancelled. The token asked for covers
        push on ``repository`` and pull on ``from_repository``. Other answers raise as every
        request does (``AuthError``, ``RegistryError``, ``UnavailableError`` after retries).
        """
        repo, source = self._repo(repository), self._repo(from_repository)
        digest = self._digest(digest)
        what = f"{self.registry}/{repo}: mount {digest} from {source}"
        url = (f"{self.base}/v2/{repo}/blobs/uploads/?"
               + urlencode({"mount": digest, "from": source}))
        status, headers, _ = await self._fetch(
            "POST", url, scopes=(*self._push(repo), *self._pull(source)), what=what,
            limit=MAX_ERROR_BODY, headers={"Content-Length": "0"}, ok=(201, 202))
        if status == 201:
            self.blobs_mounted += 1
            return True
        # 202: an upload session we will not use (a session without Location is left to expire)
        location = headers.get("Location")
        if location:
            with contextlib.suppress(RegistryError):  # on another host: not ours to cancel
                await self._cancel_upload(repo, self._location(headers, what), what)
        return False

    async def _cancel_upload(self, repo: str, location: str | None, what: str) -> None:
        """Best effort: end an upload session we will not use (it would expire anyway)."""
        if location is None:
            return
        with contextlib.suppress(UnavailableError, RegistryError, NotFoundError):
            await self._fetch("DELETE", location, scopes=self._push(repo), what=what,
                              limit=MAX_ERROR_BODY, ok=(200, 202, 204))

    def _location(self, headers: CIMultiDictProxy[str], what: str) -> str:
        location = headers.get("Location")
        if not location:
            raise RegistryError(f"{what}: upload started without a Location")
        url = urljoin(self.base + "/", location)
        if self._origin_of(url) != self._origin:
            raise RegistryError(f"{what}: upload location {_clean(url, 120)} is on another host")
        return url

    @staticmethod
    def _with_query(url: str, **params: str) -> str:
        parts = urlsplit(url)
        query = parts.query + ("&" if parts.query else "") + urlencode(params)
        return urlunsplit(parts._replace(query=query))

    def _body(self, path: Path | None, data: bytes, offset: int, size: int,
              progress: Callable[[int], None] | None) -> Callable[[], object]:
        """A factory of request bodies for ``[offset, offset + size)`` of the source."""

        async def from_file() -> AsyncIterator[bytes]:
            assert path is not None
            f: IO[bytes] = await asyncio.to_thread(open, path, "rb")
            try:
                pos, left = offset, size
                while left:
                    chunk = await asyncio.to_thread(os.pread, f.fileno(),
                                                    min(left, _FILE_CHUNK), pos)
                    if not chunk:
                        raise SourceError(f"{path}: file shrank while uploading")
                    pos += len(chunk)
                    left -= len(chunk)
                    self.bytes_uploaded += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
                    yield chunk
            finally:
                f.close()

        async def from_bytes() -> AsyncIterator[bytes]:
            view = memoryview(data)
            for pos in range(offset, offset + size, _FILE_CHUNK):
                chunk = bytes(view[pos:min(pos + _FILE_CHUNK, offset + size)])
                self.bytes_uploaded += len(chunk)
                if progress is not None:
                    progress(len(chunk))
                yield chunk

        return from_file if path is not None else from_bytes

    async def _upload(self, repo: str, location: str, digest: str, path: Path | None,
                      data: bytes, size: int, progress: Callable[[int], None] | None,
                      what: str) -> None:
        """Send the bytes to an upload session (one attempt; raises ``_Transient``)."""
        scopes = self._push(repo)
        octets = {"Content-Type": "application/octet-stream"}
        if size <= self.options.chunk_size:
            resp = await self._open(
                "PUT", self._with_query(location, digest=digest), scopes=scopes,
                what=what, headers={**octets, "Content-Length": str(size)},
                body=self._body(path, data, 0, size, progress), ok=(201,))
        else:
            offset = 0
            while offset < size:
                n = min(self.options.chunk_size, size - offset)
                resp = await self._open(
                    "PATCH", location, scopes=scopes, what=what,
                    headers={**octets, "Content-Length": str(n),
                             "Content-Range": f"{offset}-{offset + n - 1}"},
                    body=self._body(path, data, offset, n, progress), ok=(202,))
                resp.release()
                stored = resp.headers.get("Range", "")
                if stored and stored != f"0-{offset + n - 1}":
                    raise _Transient(f"{what}: registry holds {_clean(stored, 40)} "
                                     f"after sending up to {offset + n - 1}")
                location = self._location(resp.headers, what)
                offset += n
            resp = await self._open(
                "PUT", self._with_query(location, digest=digest), scopes=scopes,
                what=what, headers={"Content-Length": "0"}, ok=(201,))
        resp.release()
        echoed = resp.headers.get("Docker-Content-Digest")
        if echoed and echoed != digest:
            raise IntegrityError(f"{what}: registry stored the blob as {_clean(echoed, 80)}")


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """The system CAs' TLS context, built once per process and shared by every client
    without a ``ca_file``: loading the CA bundle takes ~20 ms, which a mount paid twice (the
    manifest's client, then the backend's) even for a plain-HTTP registry. The mount service
    builds it before it forks, so its mounts pay nothing. Never modified once built."""
    return ssl.create_default_context()
