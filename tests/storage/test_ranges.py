"""Coalescing arithmetic: one merged read's bytes handed back to the requests it covers."""

from __future__ import annotations

import itertools
import random

from nydusfs.storage import RangeRequest
from nydusfs.storage.ranges import Run, coalesce, run_sink, scatter

BLOB = "a" * 64


def test_run_sink_splits_pieces_of_any_size_among_overlapping_requests() -> None:
    """However the wire cuts a run's bytes, each request gets exactly its range, in order;
    overlapping, repeated and nested requests each get their own copy."""
    rnd = random.Random(7)
    data = rnd.randbytes(20_000)
    reqs = [RangeRequest(BLOB, 0, 5000), RangeRequest(BLOB, 5000, 3), RangeRequest(BLOB, 5003, 997),
            RangeRequest(BLOB, 100, 9000), RangeRequest(BLOB, 200, 10), RangeRequest(BLOB, 0, 5000),
            RangeRequest(BLOB, 6000, 14_000), RangeRequest(BLOB, 19_999, 1)]
    (run,) = coalesce(reqs)
    assert (run.offset, run.size) == (0, 20_000)
    expected = scatter(reqs, [run], [data[run.offset:run.offset + run.size]])
    for _ in range(20):
        cuts = [0]
        while cuts[-1] < len(data):
            cuts.append(cuts[-1] + rnd.choice([1, 7, 512, 4096, 65536]))
        assert _streamed(reqs, run, data, cuts) == expected


def _streamed(reqs: list[RangeRequest], run: Run, data: bytes, cuts: list[int]) -> list[bytes]:
    """What each request gets when ``data`` (the run's bytes) arrives cut at ``cuts``."""
    got: dict[int, bytearray] = {}

    def sink(i: int, pos: int, piece: bytes) -> None:
        buf = got.setdefault(i, bytearray())
        assert pos == len(buf)  # in order, nothing skipped or repeated
        buf += piece

    feed = run_sink(reqs, run, sink)
    for start, end in itertools.pairwise(cuts):
        feed(start, data[start:end])
    return [bytes(got.get(i, b"")) for i in range(len(reqs))]
