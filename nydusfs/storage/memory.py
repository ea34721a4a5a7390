"""The ``memory`` backend: blobs held in a dict. The reference implementation of the contract.

Used by tests (of this layer and of the filesystem above) and as the behaviour every other
backend is checked against in the conformance suite. Fault injection lets tests of retries,
EIO handling and prefetch exercise failures without a flaky disk or network.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from nydusfs.errors import NotFoundError, UnavailableError
from nydusfs.storage.base import Backend, check_range

if TYPE_CHECKING:
    from nydusfs.config import BackendConfig

__all__ = ["MemoryBackend", "from_config"]


class MemoryBackend(Backend):
    """Serves ranges of in-memory blobs; see ``storage.base`` for the contract.

    ``unavailable`` maps a blob to how many reads of it fail with ``UnavailableError`` before
    reads succeed again (``fail(blob, times)`` adds more later); a negative count fails forever.
    """

    name = "memory"

    def __init__(self, blobs: Mapping[str, bytes] | None = None, *,
                 unavailable: Mapping[str, int] | None = None) -> None:
        self.blobs: dict[str, bytes] = dict(blobs or {})
        self._failures: dict[str, int] = dict(unavailable or {})
        self._closed = False

    def put(self, blob: str, data: bytes) -> None:
        """Add or replace a blob (tests build images and then serve them)."""
        self.blobs[blob] = bytes(data)

    def fail(self, blob: str, times: int = 1) -> None:
        """Make the next ``times`` reads of ``blob`` raise ``UnavailableError`` (-1: forever)."""
        self._failures[blob] = times

    async def read(self, blob: str, offset: int, size: int) -> bytes:
        check_range(blob, offset, size)
        if self._closed:
            raise UnavailableError(f"{blob}: memory backend is closed")
        left = self._failures.get(blob, 0)
        if left:
            if left > 0:
                self._failures[blob] = left - 1
            raise UnavailableError(f"{blob}: injected failure")
        data = self.blobs.get(blob)
        if data is None:
            raise NotFoundError(f"{blob}: no such blob")
        if offset + size > len(data):
            raise NotFoundError(f"{blob}: range {offset}+{size} beyond end of blob ({len(data)})")
        return data[offset:offset + size]

    async def close(self) -> None:
        self._closed = True


def from_config(cfg: BackendConfig, image_dir: Path | None) -> MemoryBackend:
    """Registry factory: the blobs from ``backend.memory.blobs`` (tests build these)."""
    return MemoryBackend(cfg.memory.blobs)
