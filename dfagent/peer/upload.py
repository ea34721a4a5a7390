"""The upload server: other peers fetch chunks from this node's store here (aiohttp).

Routes (docs/api.md, "Peer upload API")::

    GET  /chunks/{digest}     one chunk file (application/octet-stream), 404 if not held
    POST /chunks              {"digests": [...]} -> framed chunk batch (format.chunkfile)
    GET  /healthz             (no token needed)

Only digest-named chunk files are reachable: the one path parameter must be 64 lowercase hex
digits (anything else does not match a route: 404) and becomes a file name only through
:meth:`ChunkStore.path_of`; there is no static file serving, no directory listing.

Chunks on their way: a request for a chunk this node is fetching right now (the supernode
points requesters at the peer holding a chunk's source lease, and at peers expected to hold it)
gets it *while it arrives* (cut-through, ``dfagent.peer.arrival``): its bytes are sent as they
come from the source or the upstream peer, all but the last piece, which follows once this node
has verified the chunk; a chunk that fails on its way cuts the connection mid-body, so the
requester never gets a complete chunk this node did not verify. A chunk this node reads from
the source that has not started arriving is waited for, at most :data:`INFLIGHT_WAIT` seconds,
one it asked of a peer at most :data:`PEER_WAIT`; then it is "not found". A request that has
nothing to send yet waits without taking an upload slot; in a batch, chunks already here are
sent first. The wait is short (1.5 s): the requester holds those bytes of its window while it
waits, and one told "not held" asks the supernode again, which by then may name a peer that
has it. Fan-out runs took about a second longer with 3 s, and much longer with 8 s. Shorter
still for a chunk asked of a peer, because that peer may be waiting on this one: the
supernode points requesters at peers *expected* to hold a chunk, and at the end of an image
all nodes want its last tiny chunks at once and were pointed at each other, each waiting 1.5 s
for a chunk that only came once the wait ran out; the fan-out's nodes finished 2-5 s after the
last byte crossed a link.

Limits: at most ``upload.max_concurrent`` requests are served at once; one more is refused at
once with 429 and ``Retry-After`` (the requester tries another peer rather than queueing
here). All uploads share one ``upload.rate`` budget (bytes per second), paced as they are
written. With a cluster token configured every request but ``/healthz`` must carry
``Authorization: Bearer <token>`` (401 otherwise).

Chunk files are sent as stored, after a structure check (header, sizes, digest inside): the
server does not decode them (a zstd decode and blake3 per upload would halve what a node can
serve, and the receiver must verify anyway, since it cannot trust any sender). A store that went
bad on disk is found by its readers' reports (and the supernode's quarantine) and by the agent's
own full checks when a local client re-asks for a chunk.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware

from dfagent.metrics import PeerMetrics
from dfagent.peer.arrival import Arrival, ArrivalFailed
from dfagent.peer.store import ChunkStore, check_digest
from nydusfs.format import chunkfile

__all__ = ["INFLIGHT_WAIT", "MAX_BATCH", "PEER_WAIT", "Pacer", "Pending", "UploadLimits",
           "make_upload_app"]

log = logging.getLogger(__name__)

MAX_BATCH = 256  # digests per batch request
INFLIGHT_WAIT = 1.5  # seconds a request waits for chunks still on their way here (module doc)
PEER_WAIT = 0.3  # ... for chunks on their way from a peer, not yet arriving (module doc)
# Seconds a cut-through upload waits for the next piece of its chunk, then cuts the connection:
# less than a requester's ``fetch.peer_timeout`` (10 s), so the requester sees a cut arriving
# frame (and asks elsewhere) rather than timing out and reporting this node. A source read on a
# congested link can stall for seconds (TCP retransmission back-off).
ARRIVAL_STALL = 5.0
WRITE_PIECE = 256 << 10  # bytes written (and paced) at a time
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Pacer:
    """A shared bandwidth budget: :meth:`take` waits until ``n`` bytes may be sent.

    A virtual clock of when the link is next free (plus one second of burst), so concurrent
    uploads share ``rate`` fairly in arrival order. ``rate`` 0 means unlimited.
    """

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._free_at = 0.0

    def delay(self, n: int) -> float:
        """Reserve ``n`` bytes; the seconds to wait before sending them."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        self._free_at = max(self._free_at, now - 1.0) + n / self.rate
        return max(0.0, self._free_at - now - 1.0)

    async def take(self, n: int) -> None:
        wait = self.delay(n)
        if wait > 0:
            await asyncio.sleep(wait)


class Pending(Protocol):
    """Chunks on their way into this node's store (the agent's fetcher)."""

    def fetching(self, digest: str) -> bool: ...

    def from_source(self, digest: str) -> bool: ...

    def arrival(self, digest: str) -> Arrival | None: ...

    async def wait_ready(self, digests: Iterable[str], timeout: float) -> None: ...


class UploadLimits:
    """The upload slots and pacer, and (set once the fetcher exists) what is on its way."""

    def __init__(self, max_concurrent: int, rate: int) -> None:
        self.max_concurrent = max_concurrent
        self.pacer = Pacer(rate)
        self.active = 0
        self.pending: Pending | None = None


STORE: web.AppKey[ChunkStore] = web.AppKey("store", ChunkStore)
LIMITS: web.AppKey[UploadLimits] = web.AppKey("limits", UploadLimits)
METRICS: web.AppKey[PeerMetrics] = web.AppKey("metrics", PeerMetrics)


def _auth_middleware(token: str, metrics: PeerMetrics) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def mw(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.path != "/healthz":
            given = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, expected):
                metrics.upload_rejections.labels("unauthorized").inc()
                return web.json_response(
                    {"error": {"code": "unauthorized", "message": "missing or wrong cluster "
                               "token (Authorization: Bearer TOKEN)"}}, status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="dfagent"'})
        return await handler(request)

    return mw


def _busy(metrics: PeerMetrics) -> web.Response:
    metrics.upload_rejections.labels("busy").inc()
    return web.json_response({"error": {"code": "busy", "message": "too many uploads; "
                                        "try another peer"}}, status=429,
                             headers={"Retry-After": "1"})


class _Slot:
    """One of ``max_concurrent`` upload slots, or None when all are taken."""

    def __init__(self, request: web.Request) -> None:
        self.limits = request.app[LIMITS]
        self.metrics = request.app[METRICS]

    def acquire(self) -> bool:
        if self.limits.active >= self.limits.max_concurrent:
            return False
        self.limits.active += 1
        self.metrics.uploads_active.set(self.limits.active)
        return True

    def release(self) -> None:
        self.limits.active -= 1
        self.metrics.uploads_active.set(self.limits.active)


async def _send(resp: web.StreamResponse, data: bytes | memoryview, pacer: Pacer,
                metrics: PeerMetrics) -> None:
    view = memoryview(data)
    # Paced uploads write small pieces (an eighth of a second's worth), so a slow upload
    # notices a requester that went away, and a stopping server does not wait long for it.
    step = WRITE_PIECE if pacer.rate <= 0 else max(4096, min(WRITE_PIECE, pacer.rate // 8))
    for i in range(0, len(view), step):
        piece = view[i:i + step]
        await pacer.take(len(piece))
        await resp.write(piece)
    metrics.upload_bytes.inc(len(view))


def _patience(pending: Pending, digest: str) -> float:
    """Seconds a request waits for ``digest``, on its way here, to start arriving."""
    return INFLIGHT_WAIT if pending.from_source(digest) else PEER_WAIT


async def _await_coming(request: web.Request, digests: list[str]) -> list[str]:
    """Of ``digests`` not in the store, those this node is fetching now (it holds their source
    lease, or fetches them from a peer). If none of ``digests`` is stored or arriving yet,
    first wait (at most :func:`_patience`, holding no upload slot) for one to start."""
    pending = request.app[LIMITS].pending
    if pending is None:
        return []
    store = request.app[STORE]
    coming = [d for d in digests if d not in store and pending.fetching(d)]
    if coming and not any(d in store for d in digests):
        await pending.wait_ready(coming, max(_patience(pending, d) for d in coming))
        coming = [d for d in coming if d not in store and pending.fetching(d)]
    return coming


async def _arriving(request: web.Request, digest: str, since: float) -> Arrival | None:
    """``digest`` as it arrives here, if it starts to within :func:`_patience` of ``since``
    (monotonic) and is not stored by then."""
    pending = request.app[LIMITS].pending
    if pending is None:
        return None
    store = request.app[STORE]
    a = pending.arrival(digest)
    if a is None and digest not in store and pending.fetching(digest):
        left = since + _patience(pending, digest) - time.monotonic()
        if left > 0:
            await pending.wait_ready([digest], left)
        a = pending.arrival(digest)
    return None if digest in store and (a is None or a.ok is not None) else a


async def _send_arrival(resp: web.StreamResponse, a: Arrival, slot: _Slot) -> None:
    """A chunk file as it arrives (module doc); ``ArrivalFailed`` when it fails on its way."""
    try:
        async for piece in a.read(ARRIVAL_STALL):
            await _send(resp, piece, slot.limits.pacer, slot.metrics)
    except ArrivalFailed:
        slot.metrics.cut_through.labels("cut").inc()
        raise
    slot.metrics.cut_through.labels("sent").inc()
    slot.metrics.uploads.inc()


def _cut(request: web.Request, what: str, exc: ArrivalFailed) -> None:
    """End a response mid-body: the requester must not take a partial chunk for a whole one."""
    log.info("%s for %s: %s; cutting the connection", what, request.remote, exc)
    if request.transport is not None:
        request.transport.abort()


async def _get_chunk(request: web.Request) -> web.StreamResponse:
    digest = request.match_info["digest"]
    a = await _arriving(request, digest, time.monotonic())
    slot = _Slot(request)
    if not slot.acquire():
        return _busy(slot.metrics)
    try:
        data = None if a is not None else await request.app[STORE].read(digest)
        if a is None and data is None:
            return web.json_response({"error": {"code": "not_found",
                                                "message": f"chunk {digest} not held"}},
                                     status=404)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = a.length if a is not None else len(data or b"")
        try:
            await resp.prepare(request)
            if a is not None:
                await _send_arrival(resp, a, slot)
            else:
                await _send(resp, data or b"", slot.limits.pacer, slot.metrics)
                slot.metrics.uploads.inc()
            await resp.write_eof()
        except ArrivalFailed as exc:
            _cut(request, f"chunk {digest[:12]}", exc)
        except ConnectionError:  # the requester went away (as in _get_batch): not our fault
            log.debug("chunk %s for %s: the requester went away", digest[:12], request.remote)
        return resp
    finally:
        slot.release()


async def _get_batch(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError):
        body = None
    digests = body.get("digests") if isinstance(body, dict) else None
    if (not isinstance(digests, list) or not digests or len(digests) > MAX_BATCH
            or not all(check_digest(d) for d in digests)):
        return web.json_response({"error": {"code": "bad_request", "message":
                                            f"digests: expected 1-{MAX_BATCH} chunk digests "
                                            "(64 lowercase hex)"}}, status=400)
    wanted = list(dict.fromkeys(digests))
    t0 = time.monotonic()
    coming = await _await_coming(request, wanted)
    slot = _Slot(request)
    if not slot.acquire():
        return _busy(slot.metrics)
    resp = web.StreamResponse(headers={"Content-Type": "application/x-dfagent-chunks"})
    try:
        store = request.app[STORE]
        await resp.prepare(request)
        later = set(coming)
        # What is here goes first (frames may come in any order), then what was on its way.
        for d in [d for d in wanted if d not in later] + [d for d in wanted if d in later]:
            raw = bytes.fromhex(d)
            if d in later:
                a = await _arriving(request, d, t0)
                if a is not None:
                    await resp.write(chunkfile.frame_header(raw, chunkfile.FRAME_ARRIVING,
                                                            a.length))
                    await _send_arrival(resp, a, slot)
                    continue
            data = await store.read(d)
            if data is None:
                await resp.write(chunkfile.pack_frame(raw, chunkfile.FRAME_NOT_FOUND))
                continue
            await resp.write(chunkfile.frame_header(raw, chunkfile.FRAME_FOUND, len(data)))
            await _send(resp, data, slot.limits.pacer, slot.metrics)
            slot.metrics.uploads.inc()
        await resp.write_eof()
        return resp
    except ArrivalFailed as exc:
        _cut(request, "batch", exc)
        return resp
    except ConnectionError:  # the requester went away (it got the chunks elsewhere: the
        # loser of a hedge is cancelled); aiohttp says "Connection lost" or a reset
        log.debug("batch for %s: the requester went away", request.remote)
        return resp
    finally:
        slot.release()


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def make_upload_app(store: ChunkStore, metrics: PeerMetrics, *, max_concurrent: int,
                    rate: int, token: str | None) -> web.Application:
    middlewares: list[Middleware] = [_auth_middleware(token, metrics)] if token else []
    app = web.Application(middlewares=middlewares, client_max_size=1 << 20)
    app[STORE] = store
    app[LIMITS] = UploadLimits(max_concurrent, rate)
    app[METRICS] = metrics
    app.router.add_get(r"/chunks/{digest:[0-9a-f]{64}}", _get_chunk, allow_head=False)
    app.router.add_post("/chunks", _get_batch)
    app.router.add_get("/healthz", _healthz)
    return app
