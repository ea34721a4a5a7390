"""The supernode: the scheduler peers ask "who has this chunk?".

Layers, bottom up (each imports only those below it):

* :mod:`~dfagent.supernode.model` — value types and request validation (no I/O);
* :mod:`~dfagent.supernode.peerstore` — state behind one interface: ``memory``, ``redis``;
* :mod:`~dfagent.supernode.ranking` — the peer ranking policy (pure);
* :mod:`~dfagent.supernode.scheduler` — the operations, with the injected clock and TTLs;
* :mod:`~dfagent.supernode.server` — the aiohttp API (the only module importing aiohttp.web);
* :mod:`~dfagent.supernode.client` — what peers use to talk to one of several supernodes.
"""

from __future__ import annotations

from dfagent.supernode.client import PeerRef, Registration, ReportAck, SupernodeClient
from dfagent.supernode.model import PeerInfo, PeerLoad

__all__ = ["PeerInfo", "PeerLoad", "PeerRef", "Registration", "ReportAck", "SupernodeClient"]
