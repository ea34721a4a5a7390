"""The ``s3`` backend and ``push s3://``: blobs in an S3-compatible bucket (AWS, SeaweedFS, ...).

Layout in the bucket (no prefix: the keys are just the names)::

    <prefix>/<sha256 hex>              one object per blob, named by the sha256 of its bytes
    <prefix>/bootstrap-<sha256 hex>    a pushed image's bootstrap, named by its own sha256

Both kinds are content-addressed and therefore immutable: several images share one prefix and
store their common blobs once, and an upload never has to decide whether to overwrite. A blob
key is only ever built from a name :func:`~nydusfs.storage.base.check_range` accepted, so a name
from an (untrusted) bootstrap cannot address another object.

Reads are ranged GETs over aiohttp, one per run of neighbouring ranges of a blob
(:func:`~nydusfs.storage.ranges.coalesce`). Requests are signed with botocore's SigV4 signer
(its S3 variant: no path normalisation, ``x-amz-content-sha256``), never by hand; with no
credentials at all (config, then ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``) requests go unsigned, for public buckets.

Errors (the contract of ``storage.base``, plus what S3 adds):

================================================  =====================================
404 ``NoSuchKey``, 416 ``InvalidRange``, a range   ``NotFoundError`` (final)
past the end of the object
5xx (including 503 ``SlowDown``), 429, timeouts,   ``UnavailableError`` (retried by the
refused or reset connections, truncated bodies     wrapper stack / the upload loop)
403 (``AccessDenied``, ``SignatureDoesNotMatch``,  :class:`S3Error` (final, names the
``InvalidAccessKeyId``), ``NoSuchBucket``, a       bucket and what to check): retrying
bucket in another region, other 4xx, a TLS         cannot fix credentials, and a denied
certificate that does not verify                   read must not look like a missing blob
================================================  =====================================

Uploads (:func:`upload_blobs`, :func:`upload_image`) HEAD each key first and skip objects that
are already there with the right size, send small files with one PUT and large ones as a
multipart upload (aborted on any failure), read files from disk a part at a time (memory stays
below ``concurrency * max(part_size, multipart_threshold)``), and check that the bytes sent
hash to the file's name before the object comes into existence: for a PUT before it is sent,
for a multipart upload before ``CompleteMultipartUpload``. Every PUT and part carries
``Content-MD5`` (and, when signed, its sha256), so the server rejects bytes damaged on the way.

This module never decodes or verifies chunks (the layer above does) and imports no
``aiohttp.web``. A client is used from one event loop; if that loop ends (tests that drive it
with several ``asyncio.run`` calls), the next call opens a fresh HTTP session.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import logging
import os
import random
import re
import ssl
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from yarl import URL

from nydusfs.config import S3Config
from nydusfs.errors import (
    ConfigError,
    IntegrityError,
    NotFoundError,
    SourceError,
    StorageError,
    UnavailableError,
)
from nydusfs.storage.base import Backend, RangeRequest, check_range
from nydusfs.storage.ranges import coalesce, scatter

if TYPE_CHECKING:
    from nydusfs.config import BackendConfig

__all__ = [
    "DEFAULT_MERGE_GAP",
    "DEFAULT_MULTIPART_THRESHOLD",
    "DEFAULT_PART_SIZE",
    "MIN_PART_SIZE",
    "S3Backend",
    "S3Client",
    "S3Error",
    "UploadResult",
    "bootstrap_key_name",
    "from_config",
    "parse_s3_url",
    "s3_config_from_url",
    "upload_blobs",
    "upload_image",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

KiB = 1 << 10
MiB = 1 << 20
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PARTS = 10_000  # S3's maximum part count; larger files get larger parts
DEFAULT_PART_SIZE = 16 * MiB
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB  # files larger than this go up in parts
# read_many merges ranges of a blob at most this far apart into one GET: a round trip to an
# object store costs far more than fetching a few unwanted KiB.
DEFAULT_MERGE_GAP = 64 * KiB
# An upload request slower than this (after ``timeout`` seconds of grace) is abandoned and
# retried: a server that stops reading must not hang a push forever.
_MIN_UPLOAD_RATE = 256 * KiB
_ERROR_BODY_LIMIT = 64 * KiB  # bytes of an error response read for its <Code>/<Message>
_READ_BLOCK = 1 * MiB  # file reads while hashing
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
_DNS_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# 4xx codes that mean "the bytes were damaged or slow on the way": sending again can succeed.
_TRANSIENT_CODES = frozenset({"BadDigest", "XAmzContentSHA256Mismatch", "RequestTimeout",
                              "SlowDown"})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class S3Error(StorageError):
    """S3 refused the request for a reason retrying cannot fix (credentials, bucket, region).

    Kept apart from ``NotFoundError`` so a denied read is never mistaken for a missing blob,
    and from ``UnavailableError`` so it is not retried. The message names the bucket.
    """


# -- configuration ---------------------------------------------------------------------------

def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``; no prefix -> ``""``.

    Raises ``ConfigError`` for anything else (another scheme, no bucket, a bad prefix).
    """
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"{url!r}: expected s3://BUCKET[/PREFIX]")
    bucket, prefix = parts.netloc, parts.path.strip("/")
    _check_bucket(bucket, url)
    _check_prefix(prefix, url)
    return bucket, prefix


def s3_config_from_url(url: str, *, endpoint: str | None = None, region: str | None = None,
                       addressing: str | None = None, insecure_skip_verify: bool = False,
                       ca_file: Path | None = None,
                       env: Mapping[str, str] | None = None) -> S3Config:
    """An :class:`S3Config` for ``s3://bucket/prefix`` (``nydusfs push OUT s3://...``).

    Unset options come from the environment as the AWS tools read them: the endpoint from
    ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, the region from ``AWS_REGION`` or
    ``AWS_DEFAULT_REGION`` (else ``us-east-1``); keys are read later, by :class:`S3Client`.
    """
    env = os.environ if env is None else env
    bucket, prefix = parse_s3_url(url)
    endpoint = endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    region = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"s3 endpoint: expected an http:// or https:// URL, got {endpoint!r}")
    if addressing not in (None, "path", "virtual"):
        raise ConfigError(f"s3 addressing: expected path or virtual, got {addressing!r}")
    return S3Config(bucket=bucket, prefix=prefix, endpoint=endpoint, region=region,
                    addressing=addressing, insecure_skip_verify=insecure_skip_verify,
                    ca_file=ca_file)


def bootstrap_key_name(sha256_hex: str) -> str:
    """The name (below the prefix) a bootstrap with this sha256 is pushed under."""
    return f"bootstrap-{sha256_hex}"


def _check_bucket(bucket: str, where: str) -> None:
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(f"{where}: invalid bucket name {bucket!r}")


def _check_prefix(prefix: str, where: str) -> None:
    """A prefix is ``/``-separated segments, none empty, ``.`` or ``..``, no control chars.

    Such segments would be normalised away by some HTTP stacks and proxies, so the key signed
    would not be the key stored.
    """
    if not prefix:
        return
    if any(seg in ("", ".", "..") for seg in prefix.split("/")) or any(
            ord(c) < 0x20 or c == "\x7f" for c in prefix):
        raise ConfigError(f"{where}: invalid prefix {prefix!r} (empty, '.' or '..' segments "
                          "or control characters)")


def _credentials(cfg: S3Config, env: Mapping[str, str]) -> Credentials | None:
    if cfg.access_key_id and cfg.secret_access_key:
        return Credentials(cfg.access_key_id, cfg.secret_access_key, cfg.session_token)
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return Credentials(key, secret, cfg.session_token or env.get("AWS_SESSION_TOKEN"))
    if key or secret:
        raise ConfigError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY go together "
                          "(only one is set)")
    return None


def _ssl_context(cfg: S3Config) -> ssl.SSLContext | bool:
    if cfg.insecure_skip_verify:
        return False
    if cfg.ca_file is not None:
        try:
            return ssl.create_default_context(cafile=str(cfg.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"backend.s3.ca_file: cannot load {cfg.ca_file}: {exc}") from exc
    return True


class _Signer(S3SigV4Auth):
    """botocore's S3 SigV4 signer, given the payload's sha256 instead of hashing the body.

    Uploads hash each part in a worker thread while reading it from disk (and check it against
    the blob's name); hashing it again on the event loop inside the signer would block it.
    """

    def payload(self, request: AWSRequest) -> str:
        known = request.context.get("payload_sha256")
        return known if isinstance(known, str) else super().payload(request)


# -- the client ------------------------------------------------------------------------------

class S3Client:
    """Signed S3 requests for one bucket and prefix: ranged GET, HEAD, PUT, multipart upload.

    Errors are translated here (see the module docstring). ``requests`` counts requests sent,
    by method, for tests and metrics. Reads are not retried here (the backend's wrapper stack
    does that); upload steps are retried ``attempts`` times on ``UnavailableError``, with
    exponential backoff and full jitter (``sleep`` injectable). ``resolver`` replaces DNS,
    e.g. to reach a virtual-hosted bucket name on a loopback endpoint in tests.
    """

    def __init__(self, cfg: S3Config, *, timeout: float = 30.0,
                 multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
                 part_size: int = DEFAULT_PART_SIZE, concurrency: int = 4, attempts: int = 4,
                 resolver: AbstractResolver | None = None,
                 env: Mapping[str, str] | None = None,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        where = "backend.s3"
        if not cfg.bucket:
            raise ConfigError(f"{where}.bucket: required")
        _check_bucket(cfg.bucket, f"{where}.bucket")
        prefix = cfg.prefix.strip("/")
        _check_prefix(prefix, f"{where}.prefix")
        if part_size < MIN_PART_SIZE:
            raise ConfigError(f"s3 part size: must be >= {MIN_PART_SIZE} (S3's minimum), "
                              f"got {part_size}")
        if multipart_threshold < 0 or concurrency < 1 or attempts < 1 or not timeout > 0:
            raise ConfigError("s3 client: multipart_threshold >= 0, concurrency >= 1, "
                              "attempts >= 1 and timeout > 0 are required")
        self.bucket = cfg.bucket
        self.prefix = prefix
        self.region = cfg.region
        endpoint = cfg.endpoint or f"https://s3.{cfg.region}.amazonaws.com"
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip(
                "/") or parts.query or parts.fragment or parts.username:
            raise ConfigError(f"{where}.endpoint: expected http(s)://HOST[:PORT], "
                              f"got {endpoint!r}")
        self.endpoint = endpoint.rstrip("/")
        self.addressing = cfg.addressing or ("path" if cfg.endpoint else "virtual")
        if self.addressing == "virtual" and not _DNS_BUCKET.fullmatch(self.bucket):
            raise ConfigError(f"{where}.addressing: bucket {self.bucket!r} is not a DNS name; "
                              "use addressing: path")
        if self.addressing == "virtual" and parts.scheme == "https" and "." in self.bucket:
            raise ConfigError(f"{where}.addressing: bucket {self.bucket!r} has dots, which no "
                              "TLS certificate of the endpoint covers; use addressing: path")
        self._scheme = parts.scheme
        self._netloc = parts.netloc
        self._credentials = _credentials(cfg, os.environ if env is None else env)
        self._signer = (_Signer(self._credentials, "s3", cfg.region)
                        if self._credentials is not None else None)
        self._ssl = _ssl_context(cfg)
        self._timeout = timeout
        self._resolver = resolver
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.concurrency = concurrency
        self.attempts = attempts
        self.sleep = sleep
        self.requests: Counter[str] = Counter()
        self._http: aiohttp.ClientSession | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def signed(self) -> bool:
        """Whether requests carry a signature (credentials were found)."""
        return self._signer is not None

    # -- names and URLs -----------------------------------------------------------------

    def key(self, name: str) -> str:
        """The object key for ``name`` below the prefix. ``name`` must already be validated."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def blob_key(self, blob: str) -> str:
        """The key of blob ``blob``; ``NotFoundError`` unless it is a sha256 hex name."""
        check_range(blob, 0, 0)
        return self.key(blob)

    def url(self, key: str, query: str = "") -> str:
        """The request URL of ``key`` (already percent-encoded; signed exactly as sent)."""
        path = "/" + quote(key, safe="/~")
        if self.addressing == "virtual":
            netloc = f"{self.bucket}.{self._netloc}"
        else:
            netloc, path = self._netloc, f"/{quote(self.bucket, safe='')}{path}"
        return f"{self._scheme}://{netloc}{path}" + (f"?{query}" if query else "")

    def describe(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    # -- plumbing -----------------------------------------------------------------------

    async def close(self) -> None:
        """Close connections; idempotent. A closed client raises ``UnavailableError``."""
        self._closed = True
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    async def __aenter__(self) -> S3Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise UnavailableError(f"{self.describe()}: client is closed")
        loop = asyncio.get_running_loop()
        if self._http is not None and self._http_loop is loop and not self._http.closed:
            return self._http
        if self._http is not None:  # made on another loop (one that has ended, in practice)
            stale, self._http = self._http, None
            connector = stale.connector
            stale.detach()
            if connector is not None:
                await connector.close()
        connector = aiohttp.TCPConnector(ssl=self._ssl, resolver=self._resolver, limit=64)
        self._http = aiohttp.ClientSession(
            connector=connector, auto_decompress=False,
            headers={"Accept-Encoding": "identity"},  # byte ranges of the stored bytes
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout,
                                          sock_read=self._timeout))
        self._http_loop = loop
        return self._http

    @contextlib.asynccontextmanager
    async def _send(self, method: str, key: str, *, query: str = "",
                    headers: Mapping[str, str] | None = None, body: bytes | None = None,
                    body_sha256: str | None = None) -> AsyncIterator[aiohttp.ClientResponse]:
        """One signed request; transport failures become ``UnavailableError``/``S3Error``."""
        url = self.url(key, query)
        hdrs = dict(headers or {})
        if self._signer is not None:
            req = AWSRequest(method=method, url=url, headers=hdrs)
            req.context["payload_sha256"] = body_sha256 or (
                _EMPTY_SHA256 if not body else hashlib.sha256(body).hexdigest())
            self._signer.add_auth(req)
            hdrs = {k: str(v) for k, v in req.headers.items()}
        session = await self._session()
        self.requests[method] += 1
        what = f"{method} {self.describe(key)}"
        try:
            # A file-like body is written in pieces; raw bytes would be one large write.
            data = io.BytesIO(body) if body is not None else None
            timeout = None if not body else aiohttp.ClientTimeout(  # a stalled upload ends
                total=self._timeout + len(body) / _MIN_UPLOAD_RATE,
                sock_connect=self._timeout, sock_read=self._timeout)
            async with session.request(method, URL(url, encoded=True), headers=hdrs,
                                       data=data, allow_redirects=False,
                                       timeout=timeout) as resp:
                yield resp
        except aiohttp.ClientConnectorCertificateError as exc:
            raise S3Error(f"{what}: TLS certificate of {self.endpoint} does not verify "
                          f"(ca_file / insecure_skip_verify): {exc}") from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise UnavailableError(f"{what}: {type(exc).__name__}: {exc}") from exc

    async def _error(self, resp: aiohttp.ClientResponse, method: str, key: str) -> StorageError:
        """The exception for an unexpected response (status, S3 error code and message)."""
        code = message = ""
        if method != "HEAD":
            code, message = _parse_error(await _read_upto(resp.content, _ERROR_BODY_LIMIT))
        return self._status_error(resp.status, code, message, method, key,
                                  resp.headers.get("x-amz-bucket-region"))

    def _status_error(self, status: int, code: str, message: str, method: str, key: str,
                      bucket_region: str | None = None) -> StorageError:
        what = f"{method} {self.describe(key)}"
        detail = f"{code}: {message}" if code else f"HTTP {status}"
        if code == "NoSuchBucket":
            return S3Error(f"{what}: bucket {self.bucket!r} does not exist at {self.endpoint}")
        if status == 404:
            return NotFoundError(f"{what}: no such object ({detail})")
        if status == 416:
            return NotFoundError(f"{what}: range outside the object ({detail})")
        if status == 403:
            hint = ("check the access key, the secret and the bucket's policy" if self.signed
                    else "no credentials are configured (backend.s3.access_key_id or "
                    "AWS_ACCESS_KEY_ID) and the bucket is not public")
            if method in ("GET", "HEAD"):
                hint += " (AWS also answers 403 for a missing object without s3:ListBucket)"
            return S3Error(f"{what}: access denied to bucket {self.bucket!r} ({detail}); "
                           f"{hint}")
        if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
            return UnavailableError(f"{what}: server error ({detail})")
        if status in (301, 307) or code in ("PermanentRedirect", "AuthorizationHeaderMalformed"):
            where = f" (it is in {bucket_region})" if bucket_region else ""
            return S3Error(f"{what}: bucket {self.bucket!r} is not in region "
                           f"{self.region}{where}: {detail}")
        return S3Error(f"{what}: unexpected response for bucket {self.bucket!r}: {detail}")

    async def _retrying(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(self.attempts):
            try:
                return await op()
            except UnavailableError as exc:
                if attempt + 1 >= self.attempts:
                    raise UnavailableError(
                        f"{what}: gave up after {self.attempts} attempts: {exc}") from exc
                await self.sleep(random.random() * min(5.0, 0.2 * 2.0 ** attempt))
        raise AssertionError("unreachable")

    # -- operations ---------------------------------------------------------------------

    async def get_range(self, key: str, offset: int, size: int) -> bytes:
        """Exactly ``size`` (> 0) bytes of ``key`` from ``offset``.

        ``NotFoundError`` if the object is missing or the range does not lie inside it.
        """
        if offset < 0 or size <= 0:
            raise ValueError(f"get_range needs offset >= 0 and size > 0, got {offset}+{size}")
        what = f"GET {self.describe(key)} {offset}+{size}"
        async with self._send("GET", key,
                              headers={"Range": f"bytes={offset}-{offset + size - 1}"}) as resp:
            if resp.status == 206:
                m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
                if not m:
                    raise S3Error(f"{what}: 206 without a valid Content-Range "
                                  f"({resp.headers.get('Content-Range')!r})")
                first, last = int(m.group(1)), int(m.group(2))
                total = None if m.group(3) == "*" else int(m.group(3))
                if (total is not None and offset + size > total) or (
                        first == offset and last < offset + size - 1):
                    raise NotFoundError(f"{what}: range beyond the end of the object "
                                        f"({total if total is not None else last + 1} bytes)")
                if first != offset or last != offset + size - 1:
                    raise S3Error(f"{what}: server sent bytes {first}-{last} instead")
                if resp.content_length not in (None, size):
                    raise S3Error(f"{what}: Content-Length {resp.content_length} for {size} "
                                  "bytes")
                data = await resp.read()
            elif resp.status == 200:  # the server ignored Range: take our part of the body
                if resp.content_length is not None and resp.content_length < offset + size:
                    raise NotFoundError(f"{what}: range beyond the end of the object "
                                        f"({resp.content_length} bytes)")
                data = await _read_upto(resp.content, offset + size)
                if len(data) < offset + size and resp.content_length is None:
                    raise NotFoundError(f"{what}: range beyond the end of the object "
                                        f"({len(data)} bytes)")
                data = data[offset:]
            else:
                raise await self._error(resp, "GET", key)
        if len(data) != size:  # the connection ended early: try again
            raise UnavailableError(f"{what}: body ended after {len(data)} bytes")
        return data

    async def head(self, key: str) -> int | None:
        """The object's size, or ``None`` if there is no such object."""
        async with self._send("HEAD", key) as resp:
            if resp.status == 200:
                if resp.content_length is None:
                    raise S3Error(f"HEAD {self.describe(key)}: no Content-Length")
                return resp.content_length
            if resp.status == 404:
                return None
            raise await self._error(resp, "HEAD", key)

    async def put(self, key: str, data: bytes, *, sha256: str | None = None,
                  md5: bytes | None = None) -> None:
        """One PUT of ``data`` (with ``Content-MD5``, so damaged bytes are refused)."""
        digests = ((sha256, md5) if sha256 is not None and md5 is not None
                   else await asyncio.to_thread(_digests, data))  # not on the event loop
        headers = {"Content-Type": "application/octet-stream",
                   "Content-MD5": base64.b64encode(digests[1]).decode()}
        async with self._send("PUT", key, headers=headers, body=data,
                              body_sha256=digests[0]) as resp:
            if resp.status != 200:
                raise await self._error(resp, "PUT", key)

    async def create_multipart(self, key: str) -> str:
        """Start a multipart upload; returns its upload id."""
        async with self._send("POST", key, query="uploads",
                              headers={"Content-Type": "application/octet-stream"}) as resp:
            if resp.status != 200:
                raise await self._error(resp, "POST", key)
            body = await _read_upto(resp.content, _ERROR_BODY_LIMIT)
        upload_id = _xml_text(body, "UploadId")
        if not upload_id:
            raise S3Error(f"POST {self.describe(key)}?uploads: no UploadId in the response")
        return upload_id

    async def upload_part(self, key: str, upload_id: str, number: int, data: bytes, *,
                          sha256: str, md5: bytes) -> str:
        """Upload part ``number`` (1-based); returns its ETag."""
        query = f"partNumber={number}&uploadId={_q(upload_id)}"
        headers = {"Content-MD5": base64.b64encode(md5).decode()}
        async with self._send("PUT", key, query=query, headers=headers, body=data,
                              body_sha256=sha256) as resp:
            if resp.status != 200:
                raise await self._error(resp, "PUT", key)
            etag = resp.headers.get("ETag")
        if not etag:
            raise S3Error(f"PUT {self.describe(key)} part {number}: no ETag in the response")
        return etag

    async def complete_multipart(self, key: str, upload_id: str, etags: Sequence[str]) -> None:
        """Assemble the parts (``etags[i]`` is part ``i + 1``) into the object."""
        body = ("<CompleteMultipartUpload>" + "".join(
            f"<Part><PartNumber>{i}</PartNumber><ETag>{_xml_escape(etag)}</ETag></Part>"
            for i, etag in enumerate(etags, 1)) + "</CompleteMultipartUpload>").encode()
        async with self._send("POST", key, query=f"uploadId={_q(upload_id)}",
                              headers={"Content-Type": "application/xml"}, body=body) as resp:
            if resp.status != 200:
                raise await self._error(resp, "POST", key)
            reply = await _read_upto(resp.content, _ERROR_BODY_LIMIT)
        # S3 may answer 200 and still fail: the error is then the body (it streams whitespace
        # while assembling, so the status was sent before the outcome was known).
        code, message = _parse_error(reply)
        if code:
            status = 500 if code in ("InternalError", "SlowDown", "ServiceUnavailable") else 400
            raise self._status_error(status, code, message, "POST", key)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """Discard an unfinished multipart upload and its parts."""
        async with self._send("DELETE", key, query=f"uploadId={_q(upload_id)}") as resp:
            if resp.status not in (200, 204, 404):
                raise await self._error(resp, "DELETE", key)


def _q(value: str) -> str:
    return quote(value, safe="-_.~")


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _xml_text(body: bytes, tag: str) -> str:
    """Text of the first ``tag`` element (any namespace) in an S3 XML reply, or ``""``."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return ""
    if root.tag.rpartition("}")[2] == tag:
        return (root.text or "").strip()
    found = root.find(f".//{{*}}{tag}")
    if found is None:
        found = root.find(f".//{tag}")
    return (found.text or "").strip() if found is not None else ""


def _parse_error(body: bytes) -> tuple[str, str]:
    """``(Code, Message)`` of an S3 ``<Error>`` document; ``("", "")`` if it is not one."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return "", ""
    if root.tag.rpartition("}")[2] != "Error":
        return "", ""
    return _xml_text(body, "Code"), _xml_text(body, "Message")


async def _read_upto(stream: aiohttp.StreamReader, limit: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < limit:
        part = await stream.read(min(limit - got, _READ_BLOCK))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


async def _gather(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Results in order; on the first failure the others are cancelled (and awaited), so no
    request outlives the call that wanted it (and the session it uses)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _digests(data: bytes) -> tuple[str, bytes]:
    return hashlib.sha256(data).hexdigest(), hashlib.md5(data).digest()


# -- the backend -----------------------------------------------------------------------------

class S3Backend(Backend):
    """Reads blob ranges from ``<prefix>/<sha256 hex>`` objects; contract in ``storage.base``.

    ``read_many`` sends one ranged GET per run of ranges of a blob at most ``merge_gap`` bytes
    apart (the runs of a batch go out concurrently). A zero-size read costs a HEAD, since an
    empty range cannot be asked for with ``Range``.
    """

    name = "s3"

    def __init__(self, client: S3Client, *, merge_gap: int = DEFAULT_MERGE_GAP) -> None:
        self.client = client
        self.merge_gap = merge_gap

    async def read(self, blob: str, offset: int, size: int) -> bytes:
        check_range(blob, offset, size)
        return await self._read(blob, offset, size)

    async def read_many(self, requests: Sequence[RangeRequest]) -> list[bytes]:
        for r in requests:
            check_range(r.blob, r.offset, r.size)
        runs = coalesce(requests, gap=self.merge_gap)
        if len(runs) == 1:
            datas = [await self._read(runs[0].blob, runs[0].offset, runs[0].size)]
        else:
            datas = await _gather(self._read(run.blob, run.offset, run.size) for run in runs)
        return scatter(requests, runs, datas)

    async def close(self) -> None:
        await self.client.close()

    async def _read(self, blob: str, offset: int, size: int) -> bytes:
        key = self.client.blob_key(blob)
        if size:
            return await self.client.get_range(key, offset, size)
        total = await self.client.head(key)
        if total is None:
            raise NotFoundError(f"{self.client.describe(key)}: no such blob")
        if offset > total:
            raise NotFoundError(f"{self.client.describe(key)}: offset {offset} beyond end of "
                                f"blob ({total})")
        return b""


def from_config(cfg: BackendConfig, image_dir: Path | None) -> S3Backend:
    """Registry factory: ``backend.s3`` (the image directory is not used)."""
    return S3Backend(S3Client(cfg.s3, timeout=cfg.timeout))


# -- uploads ---------------------------------------------------------------------------------

Progress = Callable[[int], None]


@dataclass(slots=True)
class UploadResult:
    """What an upload did. Keys are full object keys (prefix included)."""

    uploaded: list[str] = field(default_factory=list)  # written by this upload
    skipped: list[str] = field(default_factory=list)  # already there with the right size
    bytes_uploaded: int = 0
    bytes_skipped: int = 0
    bootstrap_key: str | None = None  # where the bootstrap went, if one was pushed

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


async def upload_blobs(client: S3Client, paths: Sequence[Path], *,
                       bootstrap: Path | None = None,
                       progress: Progress | None = None) -> UploadResult:
    """Upload blob files (each named by its sha256 hex) and optionally a bootstrap.

    Blobs go to ``<prefix>/<name>``, the bootstrap to ``<prefix>/bootstrap-<its sha256>``.
    Objects already present with the same size are skipped (they are content-addressed).
    ``progress`` is called with byte counts as parts finish or files are found present, so
    the counts add up to the files' total size. Raises ``SourceError`` for a file that cannot
    be read or whose name is not a sha256, ``IntegrityError`` if a file's bytes do not hash to
    its name (nothing is stored for it), ``S3Error``/``UnavailableError`` from S3 (the latter
    after ``client.attempts`` tries per request).
    """
    result = UploadResult()
    slots = asyncio.Semaphore(client.concurrency)  # bodies in memory at once
    jobs: dict[str, tuple[Path, str]] = {}  # key -> (file, sha256); a blob listed twice once
    for path in paths:
        name = path.name
        if not _HEX64.fullmatch(name):
            raise SourceError(f"{path}: not a blob file (its name must be 64 lowercase hex "
                              "digits, the sha256 of its bytes)")
        jobs.setdefault(client.key(name), (path, name))
    if bootstrap is not None:
        sha = await asyncio.to_thread(_file_sha256, bootstrap)
        result.bootstrap_key = client.key(bootstrap_key_name(sha))
        jobs[result.bootstrap_key] = (bootstrap, sha)
    await _gather(_push(client, key, path, sha, slots, progress, result)
                  for key, (path, sha) in jobs.items())
    return result


async def upload_image(client: S3Client, image_dir: Path, *,
                       progress: Progress | None = None) -> UploadResult:
    """Upload an image built by ``nydusfs build``: the blobs its bootstrap names, then it.

    Blobs are read from ``image_dir/blobs/``; one that is missing or has another size than the
    bootstrap records is a ``SourceError`` before anything is uploaded.
    """
    from nydusfs.errors import FormatError
    from nydusfs.format.reader import Bootstrap

    bootstrap = image_dir / "bootstrap"
    try:
        with Bootstrap.open(bootstrap) as boot:
            records = boot.blobs()
    except OSError as exc:
        raise SourceError(f"{bootstrap}: cannot read the image's bootstrap: {exc}") from exc
    except FormatError as exc:
        raise SourceError(f"{bootstrap}: not a nydusfs bootstrap: {exc}") from exc
    paths: list[Path] = []
    for rec in records:
        path = image_dir / "blobs" / rec.hex
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise SourceError(f"{path}: blob {rec.hex} of the image is missing: {exc}") from exc
        if size != rec.size:
            raise SourceError(f"{path}: {size} bytes, the bootstrap says {rec.size}")
        paths.append(path)
    return await upload_blobs(client, paths, bootstrap=bootstrap, progress=progress)


async def _push(client: S3Client, key: str, path: Path, sha: str, slots: asyncio.Semaphore,
                progress: Progress | None, result: UploadResult) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc}") from exc
    present = await client._retrying(f"HEAD {client.describe(key)}", lambda: client.head(key))
    if present == size:
        result.skipped.append(key)
        result.bytes_skipped += size
        if progress is not None:
            progress(size)
        return
    if present is not None:
        log.warning("%s: stored object has %d bytes, the file %d: uploading again",
                    client.describe(key), present, size)
    if size <= client.multipart_threshold:
        async with slots:
            data, got_sha, md5 = await asyncio.to_thread(_read_whole, path, size)
            _check_sha(path, got_sha, sha)
            await client._retrying(f"PUT {client.describe(key)}",
                                   lambda: client.put(key, data, sha256=got_sha, md5=md5))
        if progress is not None:
            progress(size)
    else:
        await _multipart(client, key, path, size, sha, slots, progress)
    stored = await client._retrying(f"HEAD {client.describe(key)}", lambda: client.head(key))
    if stored != size:
        raise S3Error(f"{client.describe(key)}: after upload the object has "
                      f"{stored} bytes, expected {size}")
    result.uploaded.append(key)
    result.bytes_uploaded += size


async def _multipart(client: S3Client, key: str, path: Path, size: int, sha: str,
                     slots: asyncio.Semaphore, progress: Progress | None) -> None:
    part_size = max(client.part_size, -(-size // MAX_PARTS))
    count = -(-size // part_size)
    where = client.describe(key)
    upload_id = await client._retrying(f"POST {where}?uploads",
                                       lambda: client.create_multipart(key))
    hasher = hashlib.sha256()  # of the whole file, fed in order as parts are read
    tasks: list[asyncio.Task[str]] = []

    async def send(number: int, data: bytes, part_sha: str, md5: bytes) -> str:
        try:
            etag = await client._retrying(
                f"PUT {where} part {number}",
                lambda: client.upload_part(key, upload_id, number, data, sha256=part_sha,
                                           md5=md5))
        finally:
            slots.release()
        if progress is not None:
            progress(len(data))
        return etag

    try:
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed below; reads happen in threads)
        except OSError as exc:
            raise SourceError(f"{path}: cannot read: {exc}") from exc
        with f:
            for number in range(1, count + 1):
                failed = next((t for t in tasks if t.done() and t.exception()), None)
                if failed is not None:
                    await failed  # raises its error
                await slots.acquire()
                try:
                    want = min(part_size, size - (number - 1) * part_size)
                    data, part_sha, md5 = await asyncio.to_thread(_read_part, f, want, hasher,
                                                                  path)
                except BaseException:
                    slots.release()
                    raise
                tasks.append(asyncio.ensure_future(send(number, data, part_sha, md5)))
            if await asyncio.to_thread(f.read, 1):
                raise SourceError(f"{path}: file grew while uploading")
        etags = list(await asyncio.gather(*tasks))
        _check_sha(path, hasher.hexdigest(), sha)  # before the object comes into existence
        try:
            await client._retrying(f"POST {where}?uploadId",
                                   lambda: client.complete_multipart(key, upload_id, etags))
        except NotFoundError:
            # NoSuchUpload after a retry: an earlier attempt may have completed it after all.
            if await client.head(key) != size:
                raise
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await asyncio.shield(client.abort_multipart(key, upload_id))
        except (StorageError, asyncio.CancelledError) as exc:
            log.warning("%s: could not abort multipart upload %s: %s", where, upload_id, exc)
        raise


def _check_sha(path: Path, got: str, want: str) -> None:
    if got != want:
        raise IntegrityError(f"{path}: sha256 of the file is {got}, expected {want}; "
                             "not uploaded")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(_READ_BLOCK):
                h.update(block)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc}") from exc
    return h.hexdigest()


def _read_whole(path: Path, size: int) -> tuple[bytes, str, bytes]:
    """The file's bytes (exactly ``size``), their sha256 hex and MD5 (in a worker thread)."""
    try:
        with open(path, "rb") as f:
            data = f.read(size + 1)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc}") from exc
    if len(data) != size:
        raise SourceError(f"{path}: file changed size while uploading")
    sha, md5 = _digests(data)
    return data, sha, md5


def _read_part(f: IO[bytes], size: int, whole: Any, path: Path) -> tuple[bytes, str, bytes]:
    """The next ``size`` bytes of ``f``, fed to ``whole``; their sha256 hex and MD5."""
    try:
        data = f.read(size)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc}") from exc
    if len(data) != size:
        raise SourceError(f"{path}: file shrank while uploading")
    whole.update(data)
    sha, md5 = _digests(data)
    return data, sha, md5
