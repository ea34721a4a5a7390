"""The peer agent: one per node, serving and fetching verified chunks peer to peer.

Layers, bottom up (each imports only those below it):

* :mod:`~dfagent.peer.config` — the YAML config, validated at the edge;
* :mod:`~dfagent.peer.store` — chunk files by digest on disk, quota + LRU, checked on read;
* :mod:`~dfagent.peer.source` — source locations and the nydusfs backends that read them;
* :mod:`~dfagent.peer.swarm` — registration, heartbeats, announce/withdraw, lookups;
* :mod:`~dfagent.peer.fetcher` — store → supernode → peers → source, single flight, verify;
* :mod:`~dfagent.peer.upload` and :mod:`~dfagent.peer.api` — the two aiohttp servers (peer
  uploads over TCP; the local API for nydusfs on a Unix socket), the only modules here that
  import ``aiohttp.web`` besides :mod:`~dfagent.peer.agent`, which wires everything together;
* :mod:`~dfagent.peer.client` — the local API client ``dfagent get`` / ``preheat`` use.

The chunk file and frame formats they exchange live in ``nydusfs.format.chunkfile`` (nydusfs's
``dragonfly`` backend speaks them too, and nydusfs never imports dfagent).
"""

from __future__ import annotations

from dfagent.peer.config import PeerConfig, load_config, parse_config

__all__ = ["PeerConfig", "load_config", "parse_config"]
