"""Fixture helpers for storage tests: deterministic blobs and a way to run coroutines.

pytest-asyncio is not a dependency; each test drives its coroutine with :func:`run`.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def blob_name(data: bytes) -> str:
    """The name a blob is stored under: sha256 hex of its bytes."""
    return hashlib.sha256(data).hexdigest()


def make_blobs() -> dict[str, bytes]:
    """Three blobs: a large pseudo-random one, a small text one, and an empty one."""
    rnd = random.Random(1234)
    datas = [rnd.randbytes(300_000), b"hello, lazy world\n" * 3, b""]
    return {blob_name(d): d for d in datas}


def write_blobs(directory: Path, blobs: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in blobs.items():
        (directory / name).write_bytes(data)
    return directory


MISSING = "0" * 64  # well-formed name of a blob no fixture contains
