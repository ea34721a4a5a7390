"""The local API on the agent's Unix socket: what nydusfs (``backend: dragonfly``), ``dfagent
get`` and ``dfagent preheat`` ask the agent (aiohttp; docs/api.md, "Local API")::

    POST /api/v1/chunks      get chunks (batched), each with its source location
    POST /api/v1/prefetch    the same body: fetch in the background, answer 202 at once
    GET  /api/v1/status      the agent's state (JSON)
    GET  /metrics            Prometheus text (also on ``metrics: HOST:PORT`` if configured)
    GET  /healthz

Request body of ``/api/v1/chunks``::

    {"deliver": "path" | "bytes" | "none",
     "sources": [<source location>, ...],
     "chunks": [{"digest": HEX64, "source": INDEX, "blob": SHA256HEX, "offset": N,
                 "size": N, "uncompressed_size": N, "flags": F, "refetch": false}, ...]}

``deliver: path`` (co-located clients) answers JSON, one entry per chunk in request order:
``{"digest", "status": "ok", "origin": "local|peer|source", "path"}`` or ``{"digest",
"status": "not_found|unavailable|integrity|bad_request", "message"}``; ``none`` is the same
without paths (preheat); ``bytes`` answers a framed chunk batch (``format.chunkfile``), one
frame per chunk in request order. ``refetch: true`` says the client found the chunk file bad
or missing: the agent checks its copy in full, drops it if bad, and fetches again.

The socket is the trust boundary (whoever can connect can make the agent fetch from the
sources it names, with the node's credentials), so it is created mode 0660. Input is validated
here where it enters; a malformed request is a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from dfagent.errors import RequestError
from dfagent.peer.fetcher import ChunkWant, Fetcher, Outcome
from dfagent.peer.source import SourceLocation, parse_location
from dfagent.peer.store import check_digest
from nydusfs.format import chunkfile
from nydusfs.format.layout import CHUNK_FLAG_ZSTD, MAX_CHUNK_SIZE

__all__ = ["MAX_CHUNKS", "make_api_app", "parse_chunks_request"]

log = logging.getLogger(__name__)

MAX_CHUNKS = 1024  # chunks per request
MAX_PREFETCH_PENDING = 100_000  # chunks queued by prefetch hints before new hints get 503
DELIVER = ("path", "bytes", "none")

FETCHER: web.AppKey[Fetcher] = web.AppKey("fetcher", Fetcher)
STATUS: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("status")
METRICS_TEXT: web.AppKey[Callable[[], bytes]] = web.AppKey("metrics_text")


def _int(item: dict[str, Any], key: str, where: str, top: int) -> int:
    value = item.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise RequestError(f"{where}.{key}: expected an integer 0..{top}")
    return value


def parse_chunks_request(body: object) -> tuple[str, list[ChunkWant], set[str]]:
    """``(deliver, wants, refetch digests)`` from a decoded request body."""
    if not isinstance(body, dict):
        raise RequestError("<body>: expected a JSON object")
    unknown = sorted(set(body) - {"deliver", "sources", "chunks"})
    if unknown:
        raise RequestError(f"{unknown[0]}: unknown field (known: deliver, sources, chunks)")
    deliver = body.get("deliver", "path")
    if deliver not in DELIVER:
        raise RequestError(f"deliver: expected one of {', '.join(DELIVER)}")
    raw_sources = body.get("sources", [])
    if not isinstance(raw_sources, list) or len(raw_sources) > 64:
        raise RequestError("sources: expected a list of at most 64 source locations")
    sources: list[SourceLocation] = [parse_location(s, f"sources[{i}]")
                                     for i, s in enumerate(raw_sources)]
    items = body.get("chunks")
    if not isinstance(items, list) or not items or len(items) > MAX_CHUNKS:
        raise RequestError(f"chunks: expected a list of 1-{MAX_CHUNKS} chunks")
    wants: list[ChunkWant] = []
    refetch: set[str] = set()
    for i, item in enumerate(items):
        where = f"chunks[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f"{where}: expected an object")
        digest = item.get("digest")
        if not isinstance(digest, str) or not check_digest(digest):
            raise RequestError(f"{where}.digest: expected 64 lowercase hex characters")
        src = item.get("source")
        loc = None
        if src is not None:
            if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < len(sources):
                raise RequestError(f"{where}.source: expected an index into sources")
            loc = sources[src]
            blob = item.get("blob")
            if not isinstance(blob, str) or len(blob) != 64 or not check_digest(blob):
                raise RequestError(f"{where}.blob: expected a sha256 (64 lowercase hex)")
        else:
            blob = ""
        flags = _int(item, "flags", where, CHUNK_FLAG_ZSTD)
        want = ChunkWant(
            digest=digest, source=loc, blob=blob,
            offset=_int(item, "offset", where, 1 << 62),
            size=_int(item, "size", where, MAX_CHUNK_SIZE + (MAX_CHUNK_SIZE >> 4)),
            uncompressed_size=_int(item, "uncompressed_size", where, MAX_CHUNK_SIZE),
            flags=flags)
        if loc is not None and (want.size == 0 or want.uncompressed_size == 0):
            raise RequestError(f"{where}.size: size and uncompressed_size are required "
                               "with a source")
        if item.get("refetch") is True:
            refetch.add(digest)
        wants.append(want)
    return str(deliver), wants, refetch


def _entry(fetcher: Fetcher, o: Outcome, with_path: bool) -> dict[str, Any]:
    if o.error is not None:
        return {"digest": o.digest, "status": o.error.code, "message": str(o.error)}
    if o.digest not in fetcher.store:  # fetched but not kept (quota, disk trouble)
        return {"digest": o.digest, "status": "unavailable",
                "message": "fetched but could not be stored; ask for bytes"}
    entry: dict[str, Any] = {"digest": o.digest, "status": "ok", "origin": o.origin}
    if with_path:
        entry["path"] = str(fetcher.store.path_of(o.digest))
    return entry


async def _body(request: web.Request) -> object:
    try:
        return await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"<body>: not valid JSON: {exc}") from exc


async def _chunks(request: web.Request) -> web.StreamResponse:
    fetcher = request.app[FETCHER]
    deliver, wants, refetch = parse_chunks_request(await _body(request))
    # Chunks nobody reads yet (deliver none: prefetch, preheat) come as a pipeline.
    outcomes = await fetcher.get_many(wants, refetch=refetch, bulk=deliver == "none")
    if deliver != "bytes":
        return web.json_response({"chunks": [_entry(fetcher, o, deliver == "path")
                                              for o in outcomes]})
    resp = web.StreamResponse(headers={"Content-Type": "application/x-dfagent-chunks"})
    await resp.prepare(request)
    for o in outcomes:
        raw = bytes.fromhex(o.digest)
        data = o.data
        if o.error is None and data is None:
            data = await fetcher.store.read(o.digest)
        if o.error is not None or data is None:
            msg = str(o.error) if o.error is not None else "evicted before it could be sent"
            await resp.write(chunkfile.pack_frame(raw, chunkfile.FRAME_ERROR, msg.encode()))
        else:
            await resp.write(chunkfile.frame_header(raw, chunkfile.FRAME_FOUND, len(data)))
            await resp.write(data)
    await resp.write_eof()
    return resp


class _Prefetch:
    """Background fetches for prefetch hints, bounded in pending chunks."""

    def __init__(self) -> None:
        self.pending = 0
        self.tasks: set[asyncio.Task[None]] = set()


PREFETCH: web.AppKey[_Prefetch] = web.AppKey("prefetch", _Prefetch)


async def _prefetch(request: web.Request) -> web.Response:
    fetcher = request.app[FETCHER]
    state = request.app[PREFETCH]
    _, wants, _ = parse_chunks_request(await _body(request))
    if state.pending + len(wants) > MAX_PREFETCH_PENDING:
        return web.json_response({"error": {"code": "busy", "message": "too many prefetch "
                                            "hints pending"}}, status=503)
    state.pending += len(wants)

    async def run() -> None:
        try:
            await fetcher.get_many(wants, bulk=True)
        finally:
            state.pending -= len(wants)

    task = asyncio.get_running_loop().create_task(run())
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)
    return web.json_response({"accepted": len(wants)}, status=202)


async def _status(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATUS]())


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS_TEXT](),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


@web.middleware
async def _errors(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestError as exc:
        return web.json_response({"error": {"code": "bad_request", "message": str(exc)}},
                                 status=400)


async def _prefetch_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    state = app[PREFETCH]
    for task in list(state.tasks):
        task.cancel()
    await asyncio.gather(*state.tasks, return_exceptions=True)


def make_api_app(fetcher: Fetcher, *, status: Callable[[], dict[str, Any]],
                 metrics_text: Callable[[], bytes]) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=4 << 20)
    app[FETCHER] = fetcher
    app[STATUS] = status
    app[METRICS_TEXT] = metrics_text
    app[PREFETCH] = _Prefetch()
    app.router.add_post("/api/v1/chunks", _chunks)
    app.router.add_post("/api/v1/prefetch", _prefetch)
    app.router.add_get("/api/v1/status", _status)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.cleanup_ctx.append(_prefetch_ctx)
    return app
