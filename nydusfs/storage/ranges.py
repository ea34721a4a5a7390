"""Coalescing a batch of range requests into as few reads as possible.

Backends whose per-read cost dominates (a syscall + thread hop for ``localfs``, a round trip for
``registry``/``s3``) call :func:`coalesce` in ``read_many`` and :func:`scatter` to cut the merged
bytes back into one result per request. Pure arithmetic: no I/O, no validation of blob names.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nydusfs.storage.base import RangeRequest, Sink

__all__ = ["Run", "coalesce", "run_sink", "scatter"]


@dataclass(frozen=True, slots=True)
class Run:
    """One read covering several requests of the same blob: ``[offset, offset + size)``."""

    blob: str
    offset: int
    size: int
    members: tuple[int, ...]  # indices into the request list, in ascending offset order


def coalesce(requests: Sequence[RangeRequest], *, gap: int = 0) -> list[Run]:
    """Group by blob and merge ranges that overlap, touch, or are at most ``gap`` bytes apart.

    ``gap=0`` merges only adjacent/overlapping ranges, so no byte is read that nobody asked for;
    network backends may pass a larger gap because a wasted byte is cheaper than a round trip.
    Runs come out sorted by (blob, offset), which keeps reads of one blob sequential.
    """
    order = sorted(range(len(requests)), key=lambda i: (requests[i].blob, requests[i].offset))
    runs: list[Run] = []
    blob = ""
    start = end = 0
    members: list[int] = []
    for i in order:
        r = requests[i]
        if members and r.blob == blob and r.offset <= end + gap:
            end = max(end, r.offset + r.size)
            members.append(i)
            continue
        if members:
            runs.append(Run(blob, start, end - start, tuple(members)))
        blob, start, end, members = r.blob, r.offset, r.offset + r.size, [i]
    if members:
        runs.append(Run(blob, start, end - start, tuple(members)))
    return runs


def scatter(requests: Sequence[RangeRequest], runs: Sequence[Run],
            datas: Sequence[bytes]) -> list[bytes]:
    """Slice each run's bytes back into per-request results, in request order."""
    out: list[bytes] = [b""] * len(requests)
    for run, data in zip(runs, datas, strict=True):
        view = memoryview(data)
        for i in run.members:
            r = requests[i]
            start = r.offset - run.offset
            out[i] = bytes(view[start:start + r.size])
    return out


def run_sink(requests: Sequence[RangeRequest], run: Run,
             sink: Sink) -> Callable[[int, bytes], None]:
    """A receiver of ``run``'s bytes as they arrive, ``(position in the run, data)``, that hands
    each member request its part: ``sink(index, position in its range, data)`` (what
    :meth:`~nydusfs.storage.base.Backend.stream_many` promises). Finding the members a piece
    touches is a bisection, so a run of a thousand tiny chunks costs no more per piece than
    one of a single chunk."""
    members = run.members
    starts = [requests[i].offset - run.offset for i in members]
    # Members may overlap (repeated ranges), so search the running maximum of their ends.
    reach = list(itertools.accumulate((s + requests[i].size for s, i in zip(starts, members,
                                                                          strict=True)), max))

    def feed(pos: int, data: bytes) -> None:
        end = pos + len(data)
        view = memoryview(data)
        for k in range(bisect.bisect_right(reach, pos), len(members)):
            start = starts[k]
            if start >= end:
                break
            i = members[k]
            stop = start + requests[i].size
            if stop <= pos:
                continue
            lo = max(pos, start)
            sink(i, lo - start, bytes(view[lo - pos:min(end, stop) - pos]))

    return feed
