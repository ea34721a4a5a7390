"""The ``registry`` backend: blob ranges read straight from an OCI registry by ranged GETs.

``nydusfs mount REF`` uses it so a container starts before its image is downloaded: each
chunk the filesystem needs is a ``GET /v2/<repository>/blobs/sha256:<name>`` with a ``Range``
header (redirects to object storage followed, auth as in :mod:`nydusfs.oci.auth`). Blob names
are the storage contract's sha256 hex; the registry digest is ``"sha256:" + name``. This module
never decodes or verifies bytes (chunks are verified above storage) and never puts a name in a
URL before :func:`~nydusfs.storage.base.check_range` accepted it.

``read_many`` coalesces ranges of one blob that overlap, touch or lie within ``merge_gap``
bytes of each other into one GET (a wasted byte costs less than a round trip), and issues the
GETs for different runs concurrently. ``stream_many`` does the same and hands each range its
bytes as they come off the wire.

Retries belong to the storage stack (``RetryingBackend`` around ``TimeoutBackend``), so the
client here makes a single attempt per request; a 429's ``Retry-After`` is therefore not
honoured on reads (the stack's backoff applies). Errors: missing blob or range ->
``NotFoundError``; timeouts, 5xx, refused connections -> ``UnavailableError``; refusals
(401/403 after the credentials there are, other 4xx) -> ``RegistryError``/``AuthError``.

The aiohttp session inside belongs to one event loop. A mount uses one loop for its life; a
backend driven from several loops in turn (tests calling ``asyncio.run`` repeatedly) gets a
fresh client on each loop and closes the previous one.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nydusfs.errors import ConfigError, UnavailableError
from nydusfs.oci.client import ClientOptions, RegistryClient
from nydusfs.storage.base import Backend, RangeRequest, Sink, check_range
from nydusfs.storage.ranges import Run, coalesce, run_sink, scatter

if TYPE_CHECKING:
    from nydusfs.config import BackendConfig

__all__ = ["DEFAULT_MERGE_GAP", "RegistryBackend", "from_config"]

DEFAULT_MERGE_GAP = 0  # bytes; the filesystem already merges within read.merge_window
_REPOSITORY = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)"
                         r"[a-z0-9]+)*)*")


class RegistryBackend(Backend):
    """Ranged blob reads from ``host``/``repository``; see the module docstring."""

    name = "registry"

    def __init__(self, host: str, repository: str, options: ClientOptions | None = None, *,
                 merge_gap: int = DEFAULT_MERGE_GAP) -> None:
        self.host = host
        self.repository = repository
        self.options = options or ClientOptions(attempts=1)
        self.merge_gap = merge_gap
        # Built now so credential files are read (and found broken) at mount time.
        self._client = RegistryClient(host, self.options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.gets = 0  # range GETs issued (after coalescing), for tests and metrics

    @property
    def client(self) -> RegistryClient:
        """The current client (its counters: ``requests_sent``, ``bytes_downloaded``)."""
        return self._client

    async def _current(self) -> RegistryClient:
        if self._closed:
            raise UnavailableError(f"registry backend {self.host}/{self.repository} is closed")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:  # used from a new event loop: the old session is dead
                old, self._client = self._client, RegistryClient(self.host, self.options)
                await old.close()
            self._loop = loop
        return self._client

    async def read(self, blob: str, offset: int, size: int) -> bytes:
        check_range(blob, offset, size)
        client = await self._current()
        self.gets += 1
        return await client.read_blob_range(self.repository, f"sha256:{blob}", offset, size)

    async def read_many(self, requests: Sequence[RangeRequest]) -> list[bytes]:
        """One GET per run of neighbouring ranges of a blob, runs fetched concurrently."""
        runs, datas = await self._get_runs(requests, None)
        return scatter(requests, runs, datas) if runs else []

    async def stream_many(self, requests: Sequence[RangeRequest], sink: Sink) -> None:
        """As :meth:`read_many`, each GET's bytes handed to ``sink`` as they arrive."""
        await self._get_runs(requests, sink)

    async def _get_runs(self, requests: Sequence[RangeRequest],
                        sink: Sink | None) -> tuple[list[Run], list[bytes]]:
        """The GETs for ``requests``' runs, concurrently: each run's bytes, or (``sink``) the
        bytes streamed to ``sink`` as they arrive and ``b""`` per run."""
        for r in requests:
            check_range(r.blob, r.offset, r.size)
        if not requests:
            return [], []
        client = await self._current()
        runs = coalesce(requests, gap=self.merge_gap)
        self.gets += len(runs)
        datas = await asyncio.gather(*(client.read_blob_range(
            self.repository, f"sha256:{run.blob}", run.offset, run.size,
            sink=None if sink is None else run_sink(requests, run, sink)) for run in runs))
        return runs, list(datas)

    async def close(self) -> None:
        self._closed = True
        await self._client.close()


def from_config(cfg: BackendConfig, image_dir: Path | None) -> RegistryBackend:
    """Registry factory: ``backend.registry.host`` and ``.repository`` are required."""
    r = cfg.registry
    if not r.host:
        raise ConfigError("backend.registry.host: required (registry host[:port], e.g. ghcr.io; "
                          "nydusfs mount REF fills it from the reference)")
    if not r.repository:
        raise ConfigError("backend.registry.repository: required (e.g. library/python)")
    if not _REPOSITORY.fullmatch(r.repository):
        raise ConfigError(f"backend.registry.repository: invalid repository name "
                          f"{r.repository!r} (lowercase path components)")
    options = ClientOptions.from_registry_config(r, timeout=cfg.timeout, attempts=1)
    return RegistryBackend(r.host, r.repository, options)
