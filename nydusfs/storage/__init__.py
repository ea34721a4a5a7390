"""Storage: byte ranges of blobs from a backend chosen by name, wrapped in one place.

This package is the only way the filesystem, the prefetcher and (later) the P2P agent get blob
bytes. :func:`create_backend` turns a :class:`~nydusfs.config.BackendConfig` into a ready
backend; the backends themselves are imported lazily, so a mount from a local directory never
imports an HTTP or S3 client. Every backend is wrapped once, here, innermost first::

    CountingBackend(            counts what the filesystem asked for and got (tests, metrics)
      RetryingBackend(          retries UnavailableError: exponential backoff, full jitter
        TimeoutBackend(         each attempt bounded by backend.timeout -> UnavailableError
          <the backend>)))      localfs | memory | registry | s3 | dragonfly

Timeout sits inside retry so a hung attempt is retried rather than ending the read; counting
sits outside so retries do not inflate "what was fetched". The error contract (not found /
unavailable / integrity) is in ``storage.base``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

from nydusfs.errors import ConfigError
from nydusfs.storage.base import Backend, ChunkInfo, RangeRequest, check_range
from nydusfs.storage.retry import CountingBackend, RetryingBackend, TimeoutBackend

if TYPE_CHECKING:
    from nydusfs.config import BackendConfig

__all__ = [
    "BACKENDS",
    "LOCAL_BACKENDS",
    "RESERVED_BACKENDS",
    "UNCACHED_BACKENDS",
    "Backend",
    "ChunkInfo",
    "CountingBackend",
    "RangeRequest",
    "RetryingBackend",
    "TimeoutBackend",
    "check_backend_type",
    "check_range",
    "create_backend",
]

# Every backend, by the name the config uses -> "module:factory". The factory has the signature
# ``(cfg: BackendConfig, image_dir: Path | None) -> Backend`` and is imported on first use.
BACKENDS: dict[str, str] = {
    "localfs": "nydusfs.storage.localfs:from_config",
    "memory": "nydusfs.storage.memory:from_config",
    "registry": "nydusfs.storage.registry:from_config",
    "s3": "nydusfs.storage.s3:from_config",
    "dragonfly": "nydusfs.storage.dragonfly:from_config",
}

# Names taken by backends of later issues (name -> issue number), so configs written for them
# fail with a clear message instead of "unknown backend".
RESERVED_BACKENDS: dict[str, int] = {}

# Backends whose blobs are already on a local disk (or in memory): a chunk cache only copies.
LOCAL_BACKENDS: frozenset[str] = frozenset({"localfs", "memory"})

# Backends the local chunk cache is off for unless the config turns it on: local ones, and
# ``dragonfly``, whose agent's chunk store is the node's one on-disk cache.
UNCACHED_BACKENDS: frozenset[str] = LOCAL_BACKENDS | {"dragonfly"}

Factory = Callable[["BackendConfig", "Path | None"], Backend]


def check_backend_type(name: str, field: str = "backend.type") -> None:
    """Raise ``ConfigError`` (naming ``field``) unless ``name`` is an implemented backend."""
    if name in BACKENDS:
        return
    if name in RESERVED_BACKENDS:
        raise ConfigError(f"{field}: backend {name!r} is not implemented yet "
                          f"(issue {RESERVED_BACKENDS[name]})")
    raise ConfigError(f"{field}: unknown backend {name!r} (known: {', '.join(sorted(BACKENDS))})")


def create_backend(cfg: BackendConfig, *, image_dir: Path | None) -> CountingBackend:
    """The backend ``cfg`` names, wrapped in the standard stack (see the module docstring).

    ``image_dir`` is the directory holding the bootstrap; backends use it for defaults
    (``localfs`` reads ``image_dir / "blobs"`` when no ``dir`` is configured). The result's
    counters (``reads``, ``bytes_read``, ``ranges``) are what the filesystem's metrics read.
    """
    check_backend_type(cfg.type)
    module_name, _, attr = BACKENDS[cfg.type].partition(":")
    factory = cast(Factory, getattr(importlib.import_module(module_name), attr))
    inner = factory(cfg, image_dir)
    timeout = TimeoutBackend(inner, cfg.timeout)
    retrying = RetryingBackend(timeout, attempts=cfg.attempts)
    counting = CountingBackend(retrying)
    for wrapper in (timeout, retrying, counting):  # what the filesystem asks of the stack
        wrapper.per_chunk = inner.per_chunk
        wrapper.warms = inner.warms
    return counting
