"""Peer stores chosen by name: ``memory`` (default, embedded) and ``redis`` (shared by replicas).

:func:`create_store` is the one place a name becomes a store; implementations are imported
lazily, so the memory store never loads redis-py. The contract every store meets is in
:mod:`dfagent.supernode.peerstore.base`.
"""

from __future__ import annotations

from dfagent.errors import ConfigError
from dfagent.supernode.config import STORE_TYPES, StoreConfig
from dfagent.supernode.peerstore.base import LookupView, PeerStore, ReportOutcome, StoreStats

__all__ = ["LookupView", "PeerStore", "ReportOutcome", "StoreStats", "create_store"]


def create_store(cfg: StoreConfig) -> PeerStore:
    """A new, not yet opened store for ``cfg`` (call ``await store.open()``)."""
    if cfg.type == "memory":
        from dfagent.supernode.peerstore.memory import MemoryPeerStore

        return MemoryPeerStore()
    if cfg.type == "redis":
        from dfagent.supernode.peerstore.redis import RedisPeerStore

        if cfg.url is None:
            raise ConfigError("store.url: required for the redis store")
        return RedisPeerStore(cfg.url, prefix=cfg.prefix, max_connections=cfg.max_connections,
                              timeout=cfg.timeout)
    raise ConfigError(f"store.type: unknown store {cfg.type!r} (known: {', '.join(STORE_TYPES)})")
