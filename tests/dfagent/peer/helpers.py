"""Chunk fixtures for peer tests: real encoded chunks and their chunk files."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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
