"""Fixtures for peer tests: real encoded chunks and their chunk files, agents in this process."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dfagent.peer.agent import RunningPeer, start_peer
from dfagent.peer.config import PeerConfig
from dfagent.peer.fetcher import ChunkWant
from dfagent.peer.source import parse_location
from dfagent.supernode.server import RunningSupernode
from nydusfs.config import HostPort
from nydusfs.format import chunkfile
from nydusfs.format.chunk import chunk_digest, encode

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@dataclass(frozen=True)
class Chunk:
    data: bytes  # decoded
    payload: bytes  # as in a blob
    flags: int
    digest: str

    @property
    def file(self) -> bytes:
        return chunkfile.pack(self.payload, self.flags, len(self.data), bytes.fromhex(self.digest))


def chunk(size: int = 4096, *, compressible: bool = False, seed: bytes | None = None) -> Chunk:
    data = (seed or b"x") * size if compressible else os.urandom(size)
    payload, flags = encode(data)
    return Chunk(data, payload, flags, chunk_digest(data).hex())


def blob_of(chunks: list[Chunk], dir: Path) -> tuple[str, list[dict[str, Any]]]:
    """Write ``chunks`` as one blob in ``dir``; (blob name, local-API items for source 0)."""
    import hashlib

    blob = b"".join(c.payload for c in chunks)
    name = hashlib.sha256(blob).hexdigest()
    dir.mkdir(parents=True, exist_ok=True)
    (dir / name).write_bytes(blob)
    items, off = [], 0
    for c in chunks:
        items.append({"digest": c.digest, "source": 0, "blob": name, "offset": off,
                      "size": len(c.payload), "uncompressed_size": len(c.data),
                      "flags": c.flags})
        off += len(c.payload)
    return name, items


def wants_of(tmp: Path, chunks: list[Chunk]) -> list[ChunkWant]:
    """``chunks`` as one blob in ``tmp / "blobs"`` (a localfs source), and the wants for them."""
    _, items = blob_of(chunks, tmp / "blobs")
    loc = parse_location({"type": "localfs", "dir": str(tmp / "blobs")}, "source")
    return [ChunkWant(i["digest"], loc, i["blob"], i["offset"], i["size"],
                      i["uncompressed_size"], i["flags"]) for i in items]


async def start_node(tmp: Path, name: str, supernodes: list[str], **kw: object) -> RunningPeer:
    """A peer agent in this process named ``name``, its upload server on a loopback port."""
    cfg = PeerConfig(id=name, listen=HostPort("127.0.0.1", 0), socket=tmp / f"{name}.sock",
                     data_dir=tmp / name, supernodes=tuple(supernodes),
                     **kw)  # type: ignore[arg-type]
    return await start_peer(cfg)


async def seeded(sn: RunningSupernode, wants: list[ChunkWant], *peers: RunningPeer) -> None:
    """Each of ``peers`` fetches ``wants`` from the source (not from one another: the fetch
    runs without the supernode, and the chunks are announced after); returns once the
    supernode lists all of them as holders of every chunk (bounded)."""
    digests = [w.digest for w in wants]
    for p in peers:
        tracker, p.fetcher.tracker = p.fetcher.tracker, None
        try:
            for o in await p.fetcher.get_many(wants):
                assert o.origin == "source"
        finally:
            p.fetcher.tracker = tracker
        assert tracker is not None
        tracker.announce(digests)
    for _ in range(1000):  # bounded: 20 s
        view = await sn.scheduler.lookup(digests, k=len(peers))
        if all(len(view.chunks.get(d, [])) == len(peers) for d in digests):
            return
        await asyncio.sleep(0.02)
    pytest.fail("the seeding peers' chunks were not announced within 20 s")
