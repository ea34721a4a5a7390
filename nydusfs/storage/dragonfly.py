"""The ``dragonfly`` backend: chunks through the node's dfagent peer, the image's source behind.

With ``backend: dragonfly`` a mount asks the local agent (``dfagent peer``, its local API on a
Unix socket) for every chunk it needs; the agent serves it from its chunk store, from another
peer, or from the image's own source, and keeps it for the next mount on the node and for other
nodes. The request names each chunk by digest *and* says where it lives at the source (the
source location, built from the backend's fallback block, plus the blob, the compressed extent,
flags and size), so the agent needs nothing else to fetch it. The wire protocol is in
docs/api.md ("Local API"); this module speaks it with a plain aiohttp client and never imports
dfagent.

Co-located delivery: the agent answers with the path of each chunk file in its store and this
backend reads the file itself (no copy through HTTP). If a path cannot be opened for lack of
permission (the agent runs in another mount namespace or as another user) the backend switches
to having the bytes sent in the HTTP body (``format.chunkfile`` frames) for good.

Trust: the agent's files and bytes are verified here (decoded, blake3 against the digest the
filesystem asked for) before they are used; a chunk file that vanished (evicted between answer
and read) or is bad is asked for once more with ``refetch`` (the agent re-verifies it, drops a
bad copy and fetches again), and if that fails too, read from the source. The filesystem
verifies again after us, as it does for every backend.

Failure: when the agent is unreachable (socket missing, connection refused, a malformed
answer) the whole batch is read from the image's own source (the fallback backend), and the
agent is left alone for ``retry_after`` seconds so a dead agent costs one failed connect, not
one per read. An agent that accepted the call but has not answered after ``PROBE_AFTER``
seconds is asked ``GET /healthz`` (every ``PROBE_AFTER`` seconds, each bounded by
``PROBE_TIMEOUT``): an agent that answers that is alive and busy (a big batch waits on peers
and on other peers' source fetches under load), so the batch keeps waiting, up to
``dragonfly.timeout`` in all — reading it from the source meanwhile would fetch the same
bytes twice, since the agent fetches them anyway. When ``dragonfly.timeout`` runs out, that
batch goes to the source and the next one asks the agent again. An agent that does not answer
the health check is hung: treated as unreachable (the batch from the source, the agent left
alone for ``retry_after``), so a hung agent costs about ``PROBE_AFTER + PROBE_TIMEOUT``
seconds, not ``dragonfly.timeout``. A dead agent never breaks a mount. Requests that
carry no chunk identity (whole-range reads, ``nydusfs check``) go to the source directly, as
do chunks whose stored encoding differs from this image's (the same content compressed
differently by another image's build: the payload must be this blob's bytes).

Prefetch (``warm``): the agent's store is the node's cache, so a whole-image prefetch asks the
agent to *have* each chunk (``deliver: none``; the agent fetches such a request as a pipeline,
and it may take minutes: a live agent gets ``WARM_TIMEOUT``) instead of reading,
decoding and verifying every chunk in the mount only to drop it: the agent verified each chunk
as it arrived, and every read later verifies it again. A chunk the agent could not get, or a
batch it could not answer, is reported not held and the prefetch reads it the ordinary way.

Counters (``stats()``, shown by the mount's status API): chunks from the agent, chunks and
batches that fell back to the source, agent failures, refetches, verification failures.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from nydusfs.errors import ConfigError, IntegrityError, UnavailableError
from nydusfs.format import chunkfile
from nydusfs.storage.base import Backend, RangeRequest, check_range

if TYPE_CHECKING:
    from nydusfs.config import BackendConfig

__all__ = ["DragonflyBackend", "DragonflyStats", "from_config", "source_location"]

log = logging.getLogger(__name__)

INLINE_DECODE = 64 * 1024  # chunks up to this size are verified on the event loop
API_CHUNKS = "http://dfagent/api/v1/chunks"
API_HEALTH = "http://dfagent/healthz"
PROBE_AFTER = 3.0  # seconds without an answer before (and between) health checks of the agent
PROBE_TIMEOUT = 5.0  # seconds a health check may take before the agent counts as hung
WARM_TIMEOUT = 600.0  # seconds a live agent may take to warm one batch (prefetch, in the back)


@dataclass(slots=True)
class DragonflyStats:
    agent_chunks: int = 0  # chunks delivered by the agent (and verified here)
    warmed_chunks: int = 0  # chunks the agent reported held for a prefetch (not read here)
    fallback_chunks: int = 0  # chunks read from the image's own source instead
    fallbacks: int = 0  # batches that went to the source because the agent was unreachable
    agent_errors: int = 0  # failed calls to the agent
    refetches: int = 0  # chunks asked for again (file vanished or bad)
    verification_failures: int = 0  # chunk files from the agent that failed verification
    deliver: str = "path"  # how chunks come from the agent now: path | bytes


class _AgentDown(Exception):
    """The agent could not answer this batch; the message says why. ``slow``: it is there
    but did not answer in time (busy, e.g. waiting on peers): only this batch goes to the
    source, later ones still ask it."""

    def __init__(self, message: str, *, slow: bool = False) -> None:
        super().__init__(message)
        self.slow = slow


class DragonflyBackend(Backend):
    """Chunks via the local agent, the source backend when it cannot help (module docstring)."""

    name = "dragonfly"
    per_chunk = True
    warms = True

    def __init__(self, socket: Path, location: dict[str, Any], source: Backend, *,
                 timeout: float = 20.0, retry_after: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.socket = Path(socket)
        self.location = location
        self.source = source
        self.timeout = timeout
        self.retry_after = retry_after
        self._clock = clock
        self._down_until = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.counters = DragonflyStats()

    def stats(self) -> dict[str, object]:
        from dataclasses import asdict

        return {"socket": str(self.socket), **asdict(self.counters)}

    # -- the Backend interface ------------------------------------------------------------

    async def read(self, blob: str, offset: int, size: int) -> bytes:
        return (await self.read_many([RangeRequest(blob, offset, size)]))[0]

    async def read_many(self, requests: Sequence[RangeRequest]) -> list[bytes]:
        for r in requests:
            check_range(r.blob, r.offset, r.size)
        if self._closed:
            raise UnavailableError(f"dragonfly backend ({self.socket}) is closed")
        out: list[bytes | None] = [None] * len(requests)
        wanted = [i for i, r in enumerate(requests) if r.chunk is not None and r.size > 0]
        if wanted and self._clock() >= self._down_until:
            got = await self._from_agent([requests[i] for i in wanted])
            for i, data in zip(wanted, got, strict=True):
                out[i] = data
        rest = [i for i, data in enumerate(out) if data is None]
        if rest:
            self.counters.fallback_chunks += len(rest)
            datas = await self.source.read_many([requests[i] for i in rest])
            for i, data in zip(rest, datas, strict=True):
                out[i] = data
        return [data if data is not None else b"" for data in out]

    async def warm(self, requests: Sequence[RangeRequest]) -> list[bool]:
        for r in requests:
            check_range(r.blob, r.offset, r.size)
        if self._closed:
            raise UnavailableError(f"dragonfly backend ({self.socket}) is closed")
        held = [False] * len(requests)
        wanted = [i for i, r in enumerate(requests) if r.chunk is not None and r.size > 0]
        if not wanted or self._clock() < self._down_until:
            return held
        try:
            answers = await self._ask([requests[i] for i in wanted], refetch=False,
                                      deliver="none", timeout=max(self.timeout, WARM_TIMEOUT))
        except _AgentDown as exc:
            self._agent_down(exc)
            return held
        for i, (kind, _) in zip(wanted, answers, strict=True):
            held[i] = kind == "held"
        self.counters.warmed_chunks += sum(held)
        return held

    async def close(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        await self.source.close()

    # -- the agent ------------------------------------------------------------------------

    async def _from_agent(self, reqs: list[RangeRequest]) -> list[bytes | None]:
        """Payloads from the agent, ``None`` where the source must serve instead."""
        out: list[bytes | None] = [None] * len(reqs)
        todo = list(range(len(reqs)))
        for attempt in range(2):  # the second round re-asks for vanished or bad files
            refetch = attempt == 1
            try:
                answers = await self._ask([reqs[i] for i in todo], refetch=refetch)
            except _AgentDown as exc:
                self.counters.fallbacks += 1
                self._agent_down(exc)
                return out
            again: list[int] = []
            for i, answer in zip(todo, answers, strict=True):
                data, retry = await self._payload(reqs[i], answer)
                if data is not None:
                    out[i] = data
                    self.counters.agent_chunks += 1
                elif retry and not refetch:
                    again.append(i)
            if not again:
                break
            self.counters.refetches += len(again)
            todo = again
        return out

    def _agent_down(self, exc: _AgentDown) -> None:
        """Count a failed call; an unreachable (not merely slow) agent is left alone for
        ``retry_after`` seconds."""
        self.counters.agent_errors += 1
        if exc.slow:
            log.info("dfagent at %s slow (%s); this batch from the source", self.socket, exc)
            return
        self._down_until = self._clock() + self.retry_after
        log.warning("dfagent at %s unreachable (%s); reading from the source for %g s",
                    self.socket, exc, self.retry_after)

    async def _payload(self, req: RangeRequest, answer: tuple[str, object]
                       ) -> tuple[bytes | None, bool]:
        """``(payload, retry)``: the verified payload, or None and whether to ask again."""
        kind, value = answer
        chunk = req.chunk
        assert chunk is not None
        if kind in ("error", "held"):
            return None, False  # the agent could not get it: the source is the last resort
        if kind == "path":
            try:
                data = await asyncio.to_thread(_read_file, str(value))
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM) and self.counters.deliver == "path":
                    log.info("cannot read dfagent's chunk files (%s); asking for bytes", exc)
                    self.counters.deliver = "bytes"
                return None, True
        else:
            data = value  # type: ignore[assignment]  # bytes from a frame
        try:
            if chunk.uncompressed_size <= INLINE_DECODE:
                cf, decoded = _verify(data, chunk.digest, chunk.uncompressed_size)
            else:
                cf, decoded = await asyncio.to_thread(_verify, data, chunk.digest,
                                                      chunk.uncompressed_size)
        except IntegrityError as exc:
            self.counters.verification_failures += 1
            log.warning("dfagent delivered a bad chunk: %s", exc)
            return None, True
        if cf.flags == chunk.flags and len(cf.payload) == req.size:
            return bytes(cf.payload), False
        if chunk.flags == 0:  # this blob stores it raw: the payload is the decoded bytes
            return decoded, False
        return None, False  # encoded differently than in this blob: read the blob's bytes

    def _http(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            # A session belongs to one loop; a backend used from a new one starts afresh
            # (the old session's loop is gone, so it is dropped rather than closed).
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.socket)))
            self._loop = loop
        return self._session

    async def _ask(self, reqs: list[RangeRequest], *, refetch: bool, deliver: str | None = None,
                   timeout: float | None = None) -> list[tuple[str, object]]:
        """One local-API call: ``("path", str)``, ``("bytes", bytes)``, ``("held", None)``
        (``deliver: none``) or ``("error", msg)`` per request, in order. Raises
        :class:`_AgentDown` for anything but a valid answer. ``deliver``: how chunks should
        come (default: bytes for a refetch, else as now); ``timeout``: how long a live agent
        may take (default ``self.timeout``)."""
        if deliver is None:
            deliver = self.counters.deliver if not refetch else "bytes"
        body = {
            "deliver": deliver,
            "sources": [self.location],
            "chunks": [{"digest": r.chunk.digest.hex(), "source": 0, "blob": r.blob,
                        "offset": r.offset, "size": r.size,
                        "uncompressed_size": r.chunk.uncompressed_size,
                        "flags": r.chunk.flags, "refetch": refetch}
                       for r in reqs if r.chunk is not None],
        }
        call = asyncio.ensure_future(self._post(body))
        try:
            await self._wait_alive(call, self.timeout if timeout is None else timeout)
            status, payload = call.result()
        except (aiohttp.ClientError, OSError) as exc:
            raise _AgentDown(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if not call.done():
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
        if status != 200:
            raise _AgentDown(f"HTTP {status}: {payload[:200]!r}")
        try:
            if deliver == "bytes":
                return _frames_answer(payload, reqs)
            return _json_answer(payload, reqs)
        except (ValueError, KeyError, TypeError, IntegrityError) as exc:
            raise _AgentDown(f"malformed answer: {exc}") from exc


    async def _post(self, body: dict[str, Any]) -> tuple[int, bytes]:
        async with self._http().post(API_CHUNKS, json=body) as resp:
            return resp.status, await resp.read()

    async def _wait_alive(self, call: asyncio.Future[tuple[int, bytes]], timeout: float) -> None:
        """Wait for ``call`` at most ``timeout`` seconds, checking every ``PROBE_AFTER`` that
        the agent is alive; raises :class:`_AgentDown` (``slow`` when it is alive)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise _AgentDown(f"no answer within {timeout:g} s", slow=True)
            done, _ = await asyncio.wait({call}, timeout=min(PROBE_AFTER, left))
            if done:
                return
            if deadline - loop.time() <= 0:
                continue  # out of time: no need to ask whether it is alive
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    async with self._http().get(API_HEALTH) as resp:
                        await resp.read()
                        alive = resp.status == 200
            except (TimeoutError, aiohttp.ClientError, OSError):
                alive = False
            if not alive:
                raise _AgentDown(f"no answer after {PROBE_AFTER:g} s and no answer to a "
                                 f"health check within {PROBE_TIMEOUT:g} s (hung)")


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(chunkfile.MAX_FRAME_BODY + 1)


def _verify(data: bytes, digest: bytes, size: int) -> tuple[chunkfile.ChunkFile, bytes]:
    cf = chunkfile.unpack(data, digest)
    return cf, chunkfile.unpack_verified(data, digest, size)


def _json_answer(payload: bytes, reqs: list[RangeRequest]) -> list[tuple[str, object]]:
    doc = json.loads(payload)
    items = doc["chunks"]
    if not isinstance(items, list) or len(items) != len(reqs):
        raise ValueError("the answer does not have one entry per chunk")
    out: list[tuple[str, object]] = []
    for req, item in zip(reqs, items, strict=True):
        assert req.chunk is not None
        if item["digest"] != req.chunk.digest.hex():
            raise ValueError("the answer's chunks are not in request order")
        if item["status"] == "ok" and isinstance(item.get("path"), str):
            out.append(("path", item["path"]))
        elif item["status"] == "ok" and "path" not in item:
            out.append(("held", None))  # deliver: none
        else:
            out.append(("error", str(item.get("message", item["status"]))))
    return out


def _frames_answer(payload: bytes, reqs: list[RangeRequest]) -> list[tuple[str, object]]:
    frames = list(chunkfile.iter_frames(payload))
    if len(frames) != len(reqs):
        raise ValueError("the answer does not have one frame per chunk")
    out: list[tuple[str, object]] = []
    for req, frame in zip(reqs, frames, strict=True):
        assert req.chunk is not None
        if frame.digest != req.chunk.digest:
            raise ValueError("the answer's frames are not in request order")
        if frame.status == chunkfile.FRAME_FOUND:
            out.append(("bytes", bytes(frame.body)))
        else:
            out.append(("error", frame.message))
    return out


def source_location(cfg: BackendConfig, image_dir: Path | None) -> dict[str, Any]:
    """The JSON source location (docs/api.md) of the image's own source per ``cfg``."""
    kind = cfg.source_type
    if kind == "registry":
        r = cfg.registry
        if not r.host or not r.repository:
            raise ConfigError("backend.registry.host: the dragonfly fallback registry needs "
                              "host and repository (nydusfs mount REF fills them)")
        return {"type": "registry", "host": r.host, "repository": r.repository,
                "plain_http": r.plain_http, "insecure_skip_verify": r.insecure_skip_verify}
    if kind == "s3":
        s = cfg.s3
        if not s.bucket:
            raise ConfigError("backend.s3.bucket: required for the dragonfly fallback s3")
        return {"type": "s3", "bucket": s.bucket, "endpoint": s.endpoint, "region": s.region,
                "prefix": s.prefix, "addressing": s.addressing,
                "insecure_skip_verify": s.insecure_skip_verify}
    if kind == "localfs":
        d = cfg.localfs.dir if cfg.localfs.dir is not None else (
            image_dir / "blobs" if image_dir is not None else None)
        if d is None:
            raise ConfigError("backend.localfs.dir: required for the dragonfly fallback "
                              "localfs (no image directory to default to)")
        return {"type": "localfs", "dir": os.path.abspath(d)}
    raise ConfigError(f"backend.dragonfly.fallback: {kind!r} cannot be a source")


def from_config(cfg: BackendConfig, image_dir: Path | None) -> DragonflyBackend:
    """Registry factory: the agent at ``backend.dragonfly.socket``, the fallback block behind."""
    import importlib

    from nydusfs.storage import BACKENDS

    location = source_location(cfg, image_dir)
    kind = cfg.source_type
    module_name, _, attr = BACKENDS[kind].partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    source: Backend = factory(replace(cfg, type=kind), image_dir)
    df = cfg.dragonfly
    return DragonflyBackend(df.socket, location, source, timeout=df.timeout,
                            retry_after=df.retry_after)
