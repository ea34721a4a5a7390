"""The peer agent's lifecycle: wire store, fetcher, swarm and the three servers together.

:func:`start_peer` opens the chunk store (rebuilding its index), starts the upload server on
``listen``, the local API on ``socket`` and, if configured, a metrics listener, then starts
the :class:`~dfagent.peer.swarm.Swarm` task that registers with the supernodes and announces
what the store holds. :meth:`RunningPeer.close` undoes it in reverse: the swarm leaves the
supernode (bounded by the client's timeout), servers stop accepting and finish what they
serve, connections and backends close, the socket file is removed. ``dfagent peer`` runs this
until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket as socket_module
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from dfagent.errors import DfagentError
from dfagent.metrics import PeerMetrics
from dfagent.peer.api import make_api_app
from dfagent.peer.config import PeerConfig
from dfagent.peer.fetcher import Fetcher
from dfagent.peer.source import SourcePool
from dfagent.peer.store import ChunkStore
from dfagent.peer.swarm import Swarm
from dfagent.peer.upload import LIMITS, make_upload_app
from dfagent.supernode.client import SupernodeClient
from dfagent.supernode.model import PeerInfo, PeerLoad

__all__ = ["RunningPeer", "start_peer"]

log = logging.getLogger(__name__)

REGISTER_WAIT = 10.0  # seconds start-up waits for the first registration attempt


@dataclass
class RunningPeer:
    """A serving agent. ``url`` is the upload server's bound address (real port)."""

    config: PeerConfig
    peer_id: str
    url: str
    advertise: str
    socket: Path
    store: ChunkStore
    fetcher: Fetcher
    sources: SourcePool
    metrics: PeerMetrics
    swarm: Swarm | None
    client: SupernodeClient | None
    runners: list[web.AppRunner]
    tasks: list[asyncio.Task[None]]
    started: float

    def metrics_text(self) -> bytes:
        return self.metrics.render(store_chunks=len(self.store), store_bytes=self.store.total)

    def status(self) -> dict[str, Any]:
        return {
            "id": self.peer_id, "address": self.advertise, "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started),
            "supernode": {"connected": self.swarm.connected if self.swarm else False,
                          "current": self.client.current if self.client else None,
                          "registrations": self.swarm.registrations if self.swarm else 0},
            "store": {**asdict(self.store.stats()), "quota": self.store.quota},
            "delivered": dict(self.metrics.delivered_by),
            "sources": self.sources.stats(),
        }

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.swarm is not None:
            await self.swarm.leave()
        for runner in reversed(self.runners):
            await runner.cleanup()
        await self.fetcher.close()
        await self.sources.close()
        if self.client is not None:
            await self.client.close()
        with contextlib.suppress(OSError):
            self.socket.unlink()


def _free_socket(path: Path) -> None:
    """Remove a stale socket file; refuse if another agent answers on it."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    probe = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: left behind by an agent that died
        return
    finally:
        probe.close()
    raise DfagentError(f"socket {path}: another agent is listening there")


async def start_peer(config: PeerConfig) -> RunningPeer:
    """Start the agent per ``config`` (see the module docstring). Raises ``DfagentError`` for
    an unusable data dir, a taken port or socket."""
    store = ChunkStore(config.data_dir, config.quota, memory=config.upload.memory)
    try:
        held = await store.open()
    except OSError as exc:
        raise DfagentError(f"data_dir {config.data_dir}: {exc}") from exc
    metrics = PeerMetrics()
    runners: list[web.AppRunner] = []
    tasks: list[asyncio.Task[None]] = []
    sources = SourcePool(config.source)
    await asyncio.to_thread(SourcePool.preload)
    client: SupernodeClient | None = None
    try:
        upload_app = make_upload_app(store, metrics, max_concurrent=config.upload.max_concurrent,
                                     rate=config.upload.rate, token=config.token)
        runner = web.AppRunner(upload_app, access_log=None, handle_signals=False)
        await runner.setup()
        runners.append(runner)
        host, port = config.listen
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as exc:
            raise DfagentError(f"listen {config.listen}: cannot bind: {exc}") from exc
        bound = runner.addresses[0][1] if runner.addresses else port
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{bound}"
        peer_id = config.peer_id(bound)
        advertise = config.advertise_url(bound)
        limits = upload_app[LIMITS]

        swarm = None
        if config.supernodes:
            client = SupernodeClient(list(config.supernodes), token=config.token,
                                     timeout=max(config.fetch.lookup_timeout, 2.0))
            info = PeerInfo(id=peer_id, address=advertise, zone=config.zone,
                            capacity=config.upload.max_concurrent)
            swarm = Swarm(client, info, store, metrics, lookup_timeout=config.fetch.lookup_timeout,
                          k=config.fetch.k,
                          load=lambda: PeerLoad(limits.active, max(0, store.quota - store.total)))
        fetcher = Fetcher(store, sources, metrics, config.fetch, tracker=swarm,
                          token=config.token)
        limits.pending = fetcher  # the upload server serves chunks still on their way
        peer = RunningPeer(config=config, peer_id=peer_id, url=url, advertise=advertise,
                           socket=config.socket, store=store, fetcher=fetcher, sources=sources,
                           metrics=metrics, swarm=swarm, client=client, runners=runners,
                           tasks=tasks, started=time.time())

        api_runner = web.AppRunner(make_api_app(fetcher, status=peer.status,
                                                metrics_text=peer.metrics_text),
                                   access_log=None, handle_signals=False)
        await api_runner.setup()
        runners.append(api_runner)
        try:
            await asyncio.to_thread(_free_socket, config.socket)
            await web.UnixSite(api_runner, str(config.socket)).start()
            os.chmod(config.socket, 0o660)
        except OSError as exc:
            raise DfagentError(f"socket {config.socket}: cannot listen: {exc}") from exc

        if config.metrics is not None:
            mapp = web.Application()

            async def scrape(request: web.Request) -> web.Response:
                return web.Response(body=peer.metrics_text(), headers={
                    "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

            mapp.router.add_get("/metrics", scrape)
            mrunner = web.AppRunner(mapp, access_log=None, handle_signals=False)
            await mrunner.setup()
            runners.append(mrunner)
            try:
                await web.TCPSite(mrunner, config.metrics.host, config.metrics.port,
                                  reuse_address=True).start()
            except OSError as exc:
                raise DfagentError(f"metrics {config.metrics}: cannot bind: {exc}") from exc
        if swarm is not None:
            tasks.append(asyncio.get_running_loop().create_task(swarm.run()))
            # Serve once registration was tried (bounded): a first request must not go to the
            # source only because the agent had not said hello to the supernode yet.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REGISTER_WAIT):
                    await swarm.first_attempt.wait()
        log.info("store %s: %d chunk(s), %d bytes (quota %d)", config.data_dir, len(held),
                 store.total, config.quota)
        return peer
    except BaseException:
        for task in tasks:
            task.cancel()
        for r in reversed(runners):
            await r.cleanup()
        await sources.close()
        if client is not None:
            await client.close()
        raise
