"""The supernode's HTTP API (aiohttp): thin handlers over the :class:`Scheduler`.

Protocol adapter only: each handler validates its input with :mod:`dfagent.supernode.model`
(untrusted input is checked where it enters), calls one scheduler method and formats JSON.
Everything the API promises is in docs/api.md; the routes::

    PUT    /api/v1/peers/{id}              register (or re-register)
    GET    /api/v1/peers/{id}              a peer's state
    DELETE /api/v1/peers/{id}              leave
    POST   /api/v1/peers/{id}/heartbeat    liveness + load
    POST   /api/v1/peers/{id}/announce     chunks the peer now holds (batched)
    POST   /api/v1/peers/{id}/withdraw     chunks it no longer holds (batched)
    POST   /api/v1/peers/{id}/reports      another peer served it bad data or timed out
    POST   /api/v1/lookup                  ranked peers for many digests
    GET    /healthz  /readyz  /metrics     (no token needed)

Errors are JSON ``{"error": {"code": ..., "message": ...}}`` with a status that says whether
to retry: 400 ``bad_request`` (the message names the field), 401 ``unauthorized``, 404
``unknown_peer`` / ``not_found``, 413 ``payload_too_large``, 503 ``store_unavailable`` (retry,
or another replica), 500 ``internal``. When a cluster token is configured every ``/api/``
request must carry ``Authorization: Bearer <token>`` (compared in constant time).

Middlewares, outermost first: metrics (latency and final status per endpoint); errors → JSON;
auth.
State lives in typed app keys; the store connection and the expiry sweeper live in
``cleanup_ctx``. Nothing here blocks the loop: the memory store is in-process dicts, the Redis
store is asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from dfagent.errors import (
    ConfigError,
    DfagentError,
    RequestError,
    StoreError,
    StoreUnavailable,
)
from dfagent.metrics import SupernodeMetrics
from dfagent.supernode.config import SupernodeConfig
from dfagent.supernode.model import (
    MAX_ANNOUNCE,
    MAX_K,
    MAX_LOOKUP,
    REPORT_REASONS,
    check_digest,
    check_peer_id,
    parse_body,
    parse_digests,
    parse_int,
    parse_peer_info,
    parse_peer_load,
    parse_zone,
)
from dfagent.supernode.peerstore import PeerStore, create_store
from dfagent.supernode.scheduler import Clock, Scheduler

__all__ = ["SCHEDULER", "RunningSupernode", "make_app", "make_ssl_context", "start_supernode"]

log = logging.getLogger(__name__)

SCHEDULER: web.AppKey[Scheduler] = web.AppKey("scheduler", Scheduler)

MAX_BODY = 2 << 20  # bytes: a full announce batch (10,000 digests) is ~0.7 MB of JSON
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- errors -----------------------------------------------------------------------------------

def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _unknown_peer(peer_id: str) -> web.Response:
    return _error(404, "unknown_peer", f"peer {peer_id!r} is not registered (or expired); "
                                       "register again")


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large"}


@web.middleware
async def _errors_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestError as exc:
        return _error(400, "bad_request", str(exc))
    except StoreUnavailable as exc:
        log.warning("peer store unavailable: %s", exc)
        request.app[SCHEDULER].metrics.store_errors.inc()
        return _error(503, "store_unavailable", "peer store unavailable; retry later")
    except StoreError as exc:
        log.error("peer store error: %s", exc)
        request.app[SCHEDULER].metrics.store_errors.inc()
        return _error(500, "store_error", "peer store error")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "error")
        resp = _error(exc.status, code, exc.reason)
        if exc.status == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="dfagent"'
        return resp
    except Exception:  # a bug: log it whole, answer in the API's format
        log.exception("internal error handling %s %s", request.method, request.path)
        return _error(500, "internal", "internal error (logged by the supernode)")


def _metrics_middleware(metrics: SupernodeMetrics) -> Middleware:
    @web.middleware
    async def mw(request: web.Request, handler: _Handler) -> web.StreamResponse:
        t0 = time.perf_counter()
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            route = request.match_info.route.name or "other"
            metrics.request_done(route, status, time.perf_counter() - t0)

    return mw


def _auth_middleware(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def mw(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.path.startswith("/api/"):
            given = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, expected):
                raise web.HTTPUnauthorized(reason="missing or wrong cluster token "
                                                  "(Authorization: Bearer TOKEN)")
        return await handler(request)

    return mw


# -- handlers ---------------------------------------------------------------------------------

async def _body(request: web.Request) -> object:
    try:
        return await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"<body>: not valid JSON: {exc}") from exc


def _peer_id(request: web.Request) -> str:
    return check_peer_id(request.match_info["peer_id"], "peer id")


async def _register(request: web.Request) -> web.Response:
    sched = request.app[SCHEDULER]
    pid = _peer_id(request)
    body = parse_body(await _body(request),
                      ("address", "zone", "labels", "capacity", "reset"), ("address",))
    info = parse_peer_info(pid, body)
    reset = body.get("reset", False)
    if not isinstance(reset, bool):
        raise RequestError(f"reset: expected true or false, got {reset!r}")
    await sched.register(info, reset=reset)
    ttl = sched.config.peer_ttl
    return web.json_response({"id": pid, "peer_ttl": ttl, "heartbeat_interval": ttl / 3,
                              "lease_ttl": sched.config.leases.ttl})


async def _heartbeat(request: web.Request) -> web.Response:
    sched = request.app[SCHEDULER]
    pid = _peer_id(request)
    raw = await _body(request) if request.can_read_body else {}
    load = parse_peer_load(parse_body(raw, ("active_uploads", "free_cache")))
    if not await sched.heartbeat(pid, load):
        return _unknown_peer(pid)
    return web.json_response({"ok": True})


async def _leave(request: web.Request) -> web.Response:
    removed = await request.app[SCHEDULER].leave(_peer_id(request))
    return web.json_response({"removed": removed})


async def _get_peer(request: web.Request) -> web.Response:
    sched = request.app[SCHEDULER]
    pid = _peer_id(request)
    status = await sched.peer(pid)
    if status is None:
        return _unknown_peer(pid)
    st = status.state
    return web.json_response({
        **st.info.to_json(),
        "load": st.load.to_json(),
        "registered_at": st.registered_at,
        "last_seen": st.last_seen,
        "live": status.live,
        "chunks": status.chunks,
        "quarantined_until": status.quarantined_until,
    })


async def _announce(request: web.Request) -> web.Response:
    pid = _peer_id(request)
    body = parse_body(await _body(request), ("digests",), ("digests",))
    digests = parse_digests(body["digests"], "digests", limit=MAX_ANNOUNCE)
    added = await request.app[SCHEDULER].announce(pid, digests)
    if added is None:
        return _unknown_peer(pid)
    return web.json_response({"added": added})


async def _withdraw(request: web.Request) -> web.Response:
    pid = _peer_id(request)
    body = parse_body(await _body(request), ("digests",), ("digests",))
    digests = parse_digests(body["digests"], "digests", limit=MAX_ANNOUNCE)
    removed = await request.app[SCHEDULER].withdraw(pid, digests)
    return web.json_response({"removed": removed})


async def _lookup(request: web.Request) -> web.Response:
    sched = request.app[SCHEDULER]
    body = parse_body(await _body(request),
                      ("digests", "requester", "zone", "k", "lease", "sizes", "expect"),
                      ("digests",))
    digests = parse_digests(body["digests"], "digests", limit=MAX_LOOKUP)
    sizes = _sizes(body["sizes"], body["digests"]) if body.get("sizes") is not None else None
    requester = body.get("requester")
    if requester is not None:
        requester = check_peer_id(requester, "requester")
    zone = parse_zone(body["zone"], "zone") if body.get("zone") is not None else None
    k = parse_int(body["k"], "k", minimum=1, maximum=MAX_K) if "k" in body else None
    lease = body.get("lease", False)
    if not isinstance(lease, bool):
        raise RequestError(f"lease: expected true or false, got {lease!r:.40}")
    if lease and requester is None:
        raise RequestError("lease: needs requester (leases are granted to a peer)")
    expect = body.get("expect", True)
    if not isinstance(expect, bool):
        raise RequestError(f"expect: expected true or false, got {expect!r:.40}")
    answer = await sched.lookup(digests, requester=requester, zone=zone, k=k, lease=lease,
                                sizes=sizes, expect=expect)
    if not answer.requester_known:
        assert requester is not None
        return _unknown_peer(requester)
    doc: dict[str, object] = {
        "chunks": answer.chunks,
        "peers": {pid: {"address": info.address, "zone": info.zone}
                  for pid, info in answer.peers.items()},
    }
    if lease:
        doc["leases"] = answer.leases
        doc["fetching"] = answer.fetching
    return web.json_response(doc)


MAX_CHUNK_SOURCE = 1 << 32  # bytes: a bound on one chunk's source size in a lookup


def _sizes(value: object, digests: object) -> dict[str, int]:
    """``sizes``: one source size in bytes per entry of ``digests`` (already checked)."""
    assert isinstance(digests, list)
    if not isinstance(value, list) or len(value) != len(digests):
        raise RequestError(f"sizes: expected a list of {len(digests)} sizes (one per digest), "
                           f"got {value!r:.40}")
    return {d: parse_int(n, f"sizes[{i}]", minimum=0, maximum=MAX_CHUNK_SOURCE)
            for i, (d, n) in enumerate(zip(digests, value, strict=True))}


async def _report(request: web.Request) -> web.Response:
    sched = request.app[SCHEDULER]
    pid = _peer_id(request)
    body = parse_body(await _body(request), ("reporter", "reason", "digest"),
                      ("reporter", "reason"))
    reporter = check_peer_id(body["reporter"], "reporter")
    reason = body["reason"]
    if reason not in REPORT_REASONS:
        raise RequestError(f"reason: expected one of {', '.join(REPORT_REASONS)}, "
                           f"got {reason!r}")
    if body.get("digest") is not None:
        check_digest(body["digest"], "digest")
    result = await sched.report(pid, reporter, str(reason))
    if result is None:
        return _unknown_peer(reporter)
    if result.counted:
        log.info("peer %s reported (%s) by %s: %d report(s)%s", pid, reason, reporter,
                 result.reports, ", quarantined" if result.quarantined else "")
    return web.json_response({"counted": result.counted, "reports": result.reports,
                              "quarantined": result.quarantined})


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    store = request.app[SCHEDULER].store
    if await store.ping():
        return web.Response(text="ready\n")
    return web.Response(status=503, text=f"peer store ({store.name}) unreachable\n")


async def _metrics(request: web.Request) -> web.Response:
    sched = request.app[SCHEDULER]
    with contextlib.suppress(StoreError):  # a down store must not break the scrape
        await sched.stats()
    return web.Response(body=sched.metrics.render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


# -- app and lifecycle --------------------------------------------------------------------

async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[SCHEDULER].store
    await store.open()
    if not await store.ping():
        log.warning("peer store (%s) unreachable at start; /readyz reports 503 until it is "
                    "back", store.name)
    try:
        yield
    finally:
        await store.close()


async def _sweeper_ctx(app: web.Application) -> AsyncIterator[None]:
    sched = app[SCHEDULER]
    interval = sched.config.sweep_every

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                gone = await sched.sweep()
            except StoreError as exc:
                sched.metrics.store_errors.inc()
                log.warning("expiry sweep failed: %s", exc)
                continue
            if gone:
                log.info("expired %d peer(s): %s", len(gone), ", ".join(gone[:10]))

    task = asyncio.create_task(loop(), name="supernode-sweeper")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def make_app(scheduler: Scheduler, *, sweeper: bool = True) -> web.Application:
    """The aiohttp app over ``scheduler``; ``sweeper=False`` leaves expiry to explicit
    :meth:`Scheduler.sweep` calls (tests with a fake clock)."""
    middlewares: list[Middleware] = [_metrics_middleware(scheduler.metrics), _errors_middleware]
    if scheduler.config.token:
        middlewares.append(_auth_middleware(scheduler.config.token))
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app[SCHEDULER] = scheduler
    r = app.router
    r.add_put("/api/v1/peers/{peer_id}", _register, name="register")
    r.add_get("/api/v1/peers/{peer_id}", _get_peer, name="peer", allow_head=False)
    r.add_delete("/api/v1/peers/{peer_id}", _leave, name="leave")
    r.add_post("/api/v1/peers/{peer_id}/heartbeat", _heartbeat, name="heartbeat")
    r.add_post("/api/v1/peers/{peer_id}/announce", _announce, name="announce")
    r.add_post("/api/v1/peers/{peer_id}/withdraw", _withdraw, name="withdraw")
    r.add_post("/api/v1/peers/{peer_id}/reports", _report, name="report")
    r.add_post("/api/v1/lookup", _lookup, name="lookup")
    r.add_get("/healthz", _healthz, name="healthz")
    r.add_get("/readyz", _readyz, name="readyz")
    r.add_get("/metrics", _metrics, name="metrics")
    app.cleanup_ctx.append(_store_ctx)
    if sweeper:
        app.cleanup_ctx.append(_sweeper_ctx)
    return app


def make_ssl_context(config: SupernodeConfig) -> ssl.SSLContext | None:
    if config.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(config.tls.cert, config.tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls.cert: cannot load {config.tls.cert} with key "
                          f"{config.tls.key}: {exc}") from exc
    return ctx


@dataclass
class RunningSupernode:
    """A supernode serving on a socket; :meth:`close` stops it (store closed, sweeper ended)."""

    runner: web.AppRunner
    scheduler: Scheduler
    url: str

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_supernode(config: SupernodeConfig, *, store: PeerStore | None = None,
                          clock: Clock = time.time, sweeper: bool = True) -> RunningSupernode:
    """Serve ``config`` (its store unless ``store`` is given) until ``close()``.

    ``url`` has the real port when ``listen`` asks for port 0. Raises ``ConfigError`` for
    unusable TLS files and :class:`~dfagent.errors.DfagentError` when the address is taken.
    """
    ssl_ctx = make_ssl_context(config)
    sched = Scheduler(store if store is not None else create_store(config.store), config,
                      clock=clock)
    runner = web.AppRunner(make_app(sched, sweeper=sweeper), access_log=None,
                           handle_signals=False)
    await runner.setup()
    host, port = config.listen
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx, reuse_address=True)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise DfagentError(f"listen {config.listen}: cannot bind: {exc}") from exc
    except BaseException:
        await runner.cleanup()
        raise
    addrs = runner.addresses
    bound_port = addrs[0][1] if addrs else port
    scheme = "https" if ssl_ctx is not None else "http"
    shown = f"[{host}]" if ":" in host else host
    return RunningSupernode(runner=runner, scheduler=sched, url=f"{scheme}://{shown}:{bound_port}")
