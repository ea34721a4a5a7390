"""Cutting a byte stream into chunks: fixed-size, or content-defined (FastCDC).

Fixed chunks make offset → chunk arithmetic trivial and suit most images. FastCDC cuts where the
content says, so an insertion early in a file does not shift every later chunk: better dedup
between versions of an image (``--chunk-dict``). Both read the stream in bounded pieces, never
a whole file.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import BinaryIO, Protocol

from pyfastcdc import FastCDC

from nydusfs.errors import BuildError
from nydusfs.format.layout import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

__all__ = ["CdcChunker", "Chunker", "FixedChunker", "make_chunker", "parse_size"]

# pyfastcdc accepts averages up to 4 MiB (its max chunk is 4x the average, capped at 16 MiB).
MAX_CDC_AVERAGE = 4 * 1024 * 1024

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Parse ``1M``, ``512KiB``, ``4MB``, ``65536`` as binary sizes (``M`` = MiB)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise BuildError(f"invalid size {text!r} (examples: 1M, 512K, 65536)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


class Chunker(Protocol):
    """Splits a stream into chunk payloads (each ``<= MAX_CHUNK_SIZE``, none empty)."""

    def split(self, stream: BinaryIO) -> Iterator[bytes]: ...


class FixedChunker:
    def __init__(self, size: int) -> None:
        self.size = size

    def split(self, stream: BinaryIO) -> Iterator[bytes]:
        while True:
            data = stream.read(self.size)
            if not data:
                return
            # A short read is not the end of a pipe or a tar member; fill the chunk so chunk
            # boundaries depend only on content offsets.
            while len(data) < self.size:
                more = stream.read(self.size - len(data))
                if not more:
                    break
                data += more
            yield data


class CdcChunker:
    def __init__(self, average: int) -> None:
        self.average = average
        self._local = threading.local()  # a FastCDC instance must not be shared by threads

    def split(self, stream: BinaryIO) -> Iterator[bytes]:
        cdc = getattr(self._local, "cdc", None)
        if cdc is None:
            avg = self.average
            cdc = self._local.cdc = FastCDC(avg, min_size=avg // 4, max_size=avg * 4)
        # cut_stream reuses its buffer: copy each chunk before the next one is produced.
        for chunk in cdc.cut_stream(stream):
            yield bytes(chunk.data)


def make_chunker(kind: str, size: int) -> Chunker:
    """Validate ``--chunker``/``--chunk-size`` together and return the chunker."""
    if size & (size - 1) or not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
        raise BuildError(f"chunk size {size} must be a power of two from 64K to 16M")
    if kind == "fixed":
        return FixedChunker(size)
    if kind == "cdc":
        if size > MAX_CDC_AVERAGE:
            raise BuildError("with --chunker cdc the chunk size (average) must be at most 4M")
        return CdcChunker(size)
    raise BuildError(f"unknown chunker {kind!r} (known: fixed, cdc)")
