"""Arrivals: a chunk file read while it arrives, its last piece only once it is verified."""

from __future__ import annotations

import asyncio

import pytest

from dfagent.peer.arrival import Arrival, ArrivalFailed

from .helpers import run

DIGEST = "ab" * 32


async def _turns() -> None:
    """Let every ready task run (a reader woken by a piece takes a few loop turns)."""
    for _ in range(10):
        await asyncio.sleep(0)


class _Reader:
    def __init__(self, a: Arrival, stall: float = 30.0) -> None:
        self.got: list[bytes] = []
        self.task = asyncio.create_task(self._read(a, stall))

    async def _read(self, a: Arrival, stall: float) -> None:
        async for piece in a.read(stall):
            self.got.append(piece)


def test_pieces_go_as_they_come_and_the_last_once_verified() -> None:
    async def go() -> None:
        a = Arrival(DIGEST, 10, gather=1)
        early = _Reader(a)
        assert a.feed(0, b"abc") is False
        await _turns()
        assert early.got == [b"abc"]
        a.feed(3, b"defg")
        late = _Reader(a)  # a reader that starts midway gets what came before too
        await _turns()
        assert early.got == late.got == [b"abc", b"defg"]
        assert a.feed(7, b"hij") is True  # complete ...
        await _turns()
        assert early.got == [b"abc", b"defg"] and not early.task.done()  # ... not verified
        a.finish(True)
        await asyncio.wait_for(asyncio.gather(early.task, late.task), 5)
        assert b"".join(early.got) == b"".join(late.got) == b"abcdefghij"
        assert a.whole() == b"abcdefghij" and a.ok is True
        after = _Reader(a)  # a reader that comes after the end gets it all at once
        await asyncio.wait_for(after.task, 5)
        assert b"".join(after.got) == b"abcdefghij"

    run(go())


def test_a_chunk_that_fails_never_reaches_its_last_piece() -> None:
    """Bad bytes (the verification failed) or a source that went away: readers stop with
    ``ArrivalFailed`` (the upload server then cuts the connection), never with a file
    that looks whole."""
    async def go() -> None:
        a = Arrival(DIGEST, 6, gather=1)
        r = _Reader(a)
        a.feed(0, b"abc")
        a.feed(3, b"xyz")
        await _turns()
        assert r.got == [b"abc"]
        a.finish(False)
        with pytest.raises(ArrivalFailed):
            await asyncio.wait_for(r.task, 5)
        assert r.got == [b"abc"]
        assert a.feed(6, b"more") is False  # nothing more is taken once it ended

    run(go())


def test_a_retried_read_is_not_taken_twice_and_a_gap_fails() -> None:
    a = Arrival(DIGEST, 8, gather=1)
    a.feed(0, b"abc")
    a.feed(0, b"ab")  # a retried source read starting over: nothing new
    assert a.feed(0, b"abcdef") is False  # the part past what is here
    assert a.pieces == [b"abc", b"def"] and a.size == 6
    a.feed(7, b"h")  # a gap: cannot come from an ordered stream
    assert a.ok is False
    b = Arrival(DIGEST, 4, gather=1)
    b.feed(0, b"abcde")  # past the length
    assert b.ok is False
    c = Arrival(DIGEST, 4, gather=1)
    c.feed(0, b"ab")
    c.finish(True)  # only a complete file can be verified
    assert c.ok is False


def test_a_stalled_arrival_ends_its_readers() -> None:
    async def go() -> None:
        a = Arrival(DIGEST, 6, gather=1)
        a.feed(0, b"abc")
        r = _Reader(a, stall=0.05)
        with pytest.raises(ArrivalFailed, match="nothing arrived"):
            await asyncio.wait_for(r.task, 5)
        assert r.got == [b"abc"]

    run(go())


def test_a_copy_that_landed_another_way_completes_the_readers() -> None:
    """The chunk landed verified through another request (a hedge's faster copy) while
    peers read this copy: they get the rest from that one, not a cut connection (which they
    would report as this node's fault) — provided what they got is its beginning."""
    async def go() -> None:
        a = Arrival(DIGEST, 8, gather=1)
        r = _Reader(a)
        a.feed(0, b"abc")
        await _turns()
        a.complete(b"abcdefgh")
        await asyncio.wait_for(r.task, 5)
        assert b"".join(r.got) == b"abcdefgh" and a.ok is True
        other = Arrival(DIGEST, 8, gather=1)  # a differently encoded copy of the same chunk
        r2 = _Reader(other)
        other.feed(0, b"abX")
        await _turns()
        other.complete(b"abcdefgh")
        with pytest.raises(ArrivalFailed):
            await asyncio.wait_for(r2.task, 5)
        assert b"".join(r2.got) == b"abX" and other.ok is False

    run(go())


def test_small_pieces_are_gathered_before_readers_see_them() -> None:
    """A source stream's packets of a few KB reach readers in pieces of at least ``gather``
    bytes (and the rest at the end), not one write to every reader per packet."""
    async def go() -> None:
        a = Arrival(DIGEST, 10_000, gather=4096)
        r = _Reader(a)
        for pos in range(0, 9000, 1000):
            a.feed(pos, bytes(1000))
            await _turns()
        assert [len(p) for p in r.got] == [5000]  # 5 KB seen, 4 KB still gathering
        assert a.feed(9000, bytes(1000)) is True
        a.finish(True)
        await asyncio.wait_for(r.task, 5)
        assert [len(p) for p in r.got] == [5000, 5000]
        assert a.whole() == bytes(10_000)

    run(go())
