"""A chunk on its way into this node, passed on to peers while it still arrives (cut-through).

When many nodes start one image, each chunk crosses the source link once, to the node holding
its lease, and every other node gets it from that node or from one that already has it. If a
node could serve a chunk only once all of it had landed, every hop would add a chunk's whole
transfer time: a 1 MiB chunk from a registry link shared by 30 streams takes 2-3 s, so the
other nodes ran that far behind the registry all through a fan-out, and the image finished
that much after the registry had sent its last byte (docs/benchmarks.md, section 8).

An :class:`Arrival` is the chunk file (``format.chunkfile``) as it comes in, from the source
(the agent writes the chunk file's header, then the payload as the GET delivers it) or from a
peer (the frame's body). The upload server sends its pieces to requesters as they come, with
one rule that keeps the end-to-end guarantee: **the piece that completes the file is held back
until this node has verified the whole chunk** (decoded, blake3 against the digest). A
requester therefore never receives a complete chunk this node has not verified; if the chunk
fails (bad bytes, the source or the upstream peer went away), the requester's connection is
cut mid-body and it gets the chunk elsewhere. Requesters verify everything themselves anyway.

Pure bookkeeping: no I/O, one event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

__all__ = ["FEED_PIECE", "Arrival", "ArrivalFailed"]

# Bytes gathered before readers see (and wake for) them. A registry stream comes in packets of
# a few KB; passed on one by one, each piece of a 1 MiB chunk became a write to every reader
# (seven in an 8-node fan-out) and a wake-up of each: on a busy machine, that CPU went missing
# from reading the source.
FEED_PIECE = 64 << 10


class ArrivalFailed(Exception):
    """The chunk did not arrive whole and verified: stop sending it (cut the connection)."""


class Arrival:
    """One chunk file arriving: its ``pieces`` so far, and whether it ended verified (``ok``).

    ``length`` is the whole file's size, known from the start (a frame header, or the source
    location's payload size). ``ok`` is None while it arrives, True once complete and
    verified, False when it failed. Readers see what arrived in pieces of at least ``gather``
    bytes (and the last one).
    """

    __slots__ = ("_changed", "_tail", "digest", "gather", "length", "ok", "pieces", "size")

    def __init__(self, digest: str, length: int, *, gather: int = FEED_PIECE) -> None:
        self.digest = digest
        self.length = length
        self.gather = gather
        self.pieces: list[bytes] = []  # what readers may see
        self._tail = bytearray()  # arrived, gathered until FEED_PIECE (or the end)
        self.size = 0  # bytes of ``pieces`` and ``_tail``
        self.ok: bool | None = None
        self._changed: asyncio.Event | None = None  # made when a reader waits

    def feed(self, pos: int, data: bytes) -> bool:
        """Bytes at ``pos`` of the file. Bytes it already has are skipped (a retried source
        read starts again at 0). Whether this completed the file. A gap or bytes past
        ``length`` cannot come from an ordered stream: the arrival fails."""
        if self.ok is not None:
            return False
        end = pos + len(data)
        if end <= self.size:
            return False
        if pos > self.size or end > self.length:
            self.finish(False)
            return False
        piece = data if pos == self.size else data[self.size - pos:]
        self.size = end
        if not self._tail and (len(piece) >= self.gather or end == self.length):
            self.pieces.append(piece)
        else:
            self._tail += piece
            if len(self._tail) < self.gather and end < self.length:
                return False
            self.pieces.append(bytes(self._tail))
            self._tail.clear()
        self._wake()
        return end == self.length

    def whole(self) -> bytes:
        """The file's bytes so far, joined."""
        if not self._tail and len(self.pieces) == 1:
            return self.pieces[0]
        return b"".join(self.pieces) + self._tail

    def complete(self, data: bytes) -> None:
        """The chunk landed here verified by another way (the other copy of a hedge, or a
        retry after this copy's peer went away): readers get the rest from ``data``, if what
        arrived so far is its beginning (peers hold the same chunk file for a digest, but one
        stored from another image's blob may be encoded differently); else they are cut off."""
        if self.ok is not None:
            return
        if len(data) != self.length or data[:self.size] != self.whole():
            self.finish(False)
            return
        if self.size < self.length:
            self.pieces.append(data[self.size - len(self._tail):])  # the tail was unseen
            self._tail.clear()
            self.size = self.length
        self.finish(True)

    def finish(self, ok: bool) -> None:
        """The chunk was verified (``ok``; only a complete file can be) or failed."""
        if self.ok is None:
            self.ok = ok and self.size == self.length
            self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def read(self, stall: float) -> AsyncIterator[bytes]:
        """The file's pieces as they may be sent: every piece as it comes, except the one
        that completes the file, which only once it is verified. ``ArrivalFailed`` when the
        chunk failed, or nothing came for ``stall`` seconds."""
        i = sent = 0
        while True:
            while i < len(self.pieces):
                piece = self.pieces[i]
                if sent + len(piece) >= self.length and self.ok is not True:
                    break  # the last piece: held back until verified
                yield piece
                sent += len(piece)
                i += 1
            if sent >= self.length:
                return
            if self.ok is not None:  # failed (a verified file has every piece sendable)
                raise ArrivalFailed(f"chunk {self.digest}: failed on its way here")
            if self._changed is None:
                self._changed = asyncio.Event()
            try:
                async with asyncio.timeout(stall):
                    await self._changed.wait()
            except TimeoutError:
                raise ArrivalFailed(f"chunk {self.digest}: nothing arrived for "
                                    f"{stall:g} s") from None
