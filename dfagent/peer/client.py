"""A client of the agent's local API, and the image reading ``dfagent get``/``preheat`` share.

``dfagent get`` and ``dfagent preheat`` do not fetch anything themselves: they read an image's
bootstrap (a local file, or an image reference whose bootstrap is fetched and checked the
way ``nydusfs mount REF`` does it), turn its chunk records into local-API requests with the
image's source location, and let the node's agent do the work (store, peers, source). So a
preheated image is in the agent's store and announced to the supernode, exactly as if a mount
had read it.

Errors: :class:`~dfagent.errors.AgentError` when the socket cannot be reached or the agent
refuses a request; nydusfs errors (bad reference, unreadable bootstrap) pass through.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from dfagent.errors import AgentError
from nydusfs.errors import IntegrityError
from nydusfs.format import chunkfile
from nydusfs.format.reader import Bootstrap
from nydusfs.format.records import ChunkRecord

__all__ = ["AgentClient", "ImageSource", "open_image"]


@dataclass
class ImageSource:
    """An opened image: its bootstrap and the source location of its blobs."""

    boot: Bootstrap
    location: dict[str, Any]
    cleanup: AbstractContextManager[Any] | None = None

    def close(self) -> None:
        self.boot.close()
        if self.cleanup is not None:
            self.cleanup.__exit__(None, None, None)

    def item(self, rec: ChunkRecord) -> dict[str, Any]:
        """The local-API chunk entry for ``rec`` (source index 0: this image's location)."""
        return {"digest": rec.hex, "source": 0, "blob": self.boot.blob(rec.blob_index).hex,
                "offset": rec.compressed_offset, "size": rec.compressed_size,
                "uncompressed_size": rec.uncompressed_size, "flags": rec.flags}


def open_image(image: str, *, blobs: Path | None = None, plain_http: bool | None = None,
               timeout: float = 30.0, platform: str = "linux/amd64") -> ImageSource:
    """A bootstrap file (blobs in ``blobs`` or beside it) or an image reference."""
    import os

    from nydusfs.config import RegistryConfig
    from nydusfs.mount import fetch_remote_bootstrap, resolve_image_arg

    target = resolve_image_arg(image)
    if isinstance(target, Path):
        blob_dir = blobs if blobs is not None else target.resolve().parent / "blobs"
        return ImageSource(Bootstrap.open(target),
                           {"type": "localfs", "dir": os.path.abspath(blob_dir)})
    tmp = tempfile.TemporaryDirectory(prefix="dfagent-image-")
    try:
        reg = RegistryConfig(host=target.registry, repository=target.repository,
                             plain_http=plain_http)
        path = fetch_remote_bootstrap(target, reg, cache_dir=Path(tmp.name), timeout=timeout,
                                      attempts=3, platform=platform)
        boot = Bootstrap.open(path)
    except BaseException:
        tmp.cleanup()
        raise
    location = {"type": "registry", "host": target.registry, "repository": target.repository,
                "plain_http": plain_http}
    return ImageSource(boot, location, tmp)


class AgentClient:
    """Calls the local API over the agent's Unix socket (one aiohttp session)."""

    def __init__(self, socket: Path, *, timeout: float = 300.0) -> None:
        self.socket = socket
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AgentClient:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.socket)),
            timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def _post(self, path: str, body: dict[str, Any]) -> bytes:
        assert self._session is not None, "use AgentClient as an async context manager"
        try:
            async with self._session.post(f"http://dfagent{path}", json=body) as resp:
                data = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise AgentError(f"dfagent at {self.socket}: {type(exc).__name__}: {exc}") from exc
        if status >= 300:
            try:
                msg = json.loads(data)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = data[:200].decode("utf-8", "replace")
            raise AgentError(f"dfagent at {self.socket}: HTTP {status}: {msg}")
        return data

    async def status(self) -> dict[str, Any]:
        assert self._session is not None
        try:
            async with self._session.get("http://dfagent/api/v1/status") as resp:
                doc: dict[str, Any] = await resp.json()
                return doc
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise AgentError(f"dfagent at {self.socket}: {exc}") from exc

    async def ensure(self, sources: Sequence[dict[str, Any]], items: Sequence[dict[str, Any]]
                     ) -> list[dict[str, Any]]:
        """Have the agent hold these chunks; its JSON entry per chunk (``deliver: none``)."""
        data = await self._post("/api/v1/chunks", {"deliver": "none", "sources": list(sources),
                                                   "chunks": list(items)})
        try:
            entries: list[dict[str, Any]] = json.loads(data)["chunks"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AgentError(f"dfagent at {self.socket}: malformed answer: {exc}") from exc
        return entries

    async def fetch(self, sources: Sequence[dict[str, Any]], items: Sequence[dict[str, Any]]
                    ) -> dict[str, bytes | str]:
        """Decoded, verified chunk bytes by digest, or the agent's error message."""
        data = await self._post("/api/v1/chunks", {"deliver": "bytes", "sources": list(sources),
                                                   "chunks": list(items)})
        out: dict[str, bytes | str] = {}
        sizes = {i["digest"]: i.get("uncompressed_size") or None for i in items}
        try:
            frames = list(chunkfile.iter_frames(data))
        except IntegrityError as exc:
            raise AgentError(f"dfagent at {self.socket}: malformed answer: {exc}") from exc
        for frame in frames:
            d = frame.digest.hex()
            if d not in sizes:
                raise AgentError(f"dfagent at {self.socket}: sent chunk {d} not asked for")
            if frame.status != chunkfile.FRAME_FOUND:
                out[d] = frame.message
                continue
            try:
                out[d] = await asyncio.to_thread(chunkfile.unpack_verified, frame.body,
                                                 frame.digest, sizes[d])
            except IntegrityError as exc:
                out[d] = f"bad chunk from the agent: {exc}"
        return out
