"""The storage contract (``nydusfs.storage.base``), run over every implementation.

Each backend — and the wrapped stack ``create_backend`` returns — must behave identically here;
a new backend joins by adding one entry to ``IMPLEMENTATIONS``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nydusfs.config import BackendConfig, LocalFsConfig, MemoryConfig
from nydusfs.errors import NotFoundError, StorageError
from nydusfs.storage import Backend, RangeRequest, create_backend
from nydusfs.storage.localfs import LocalFsBackend
from nydusfs.storage.memory import MemoryBackend

from .helpers import MISSING, make_blobs, run, write_blobs

Blobs = dict[str, bytes]


def _memory(blobs: Blobs, tmp: Path) -> Backend:
    return MemoryBackend(blobs)


def _localfs(blobs: Blobs, tmp: Path) -> Backend:
    return LocalFsBackend(write_blobs(tmp / "blobs", blobs))


def _stack(blobs: Blobs, tmp: Path) -> Backend:
    cfg = BackendConfig(type="localfs", attempts=2,
                        localfs=LocalFsConfig(dir=write_blobs(tmp / "blobs", blobs)))
    return create_backend(cfg, image_dir=None)


def _memory_stack(blobs: Blobs, tmp: Path) -> Backend:
    cfg = BackendConfig(type="memory", attempts=2, memory=MemoryConfig(blobs=blobs))
    return create_backend(cfg, image_dir=None)


IMPLEMENTATIONS: dict[str, Callable[[Blobs, Path], Backend]] = {
    "memory": _memory,
    "localfs": _localfs,
    "stack-localfs": _stack,
    "stack-memory": _memory_stack,
}


@pytest.fixture(scope="module")
def blobs() -> Blobs:
    return make_blobs()


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def backend(request: pytest.FixtureRequest, blobs: Blobs, tmp_path: Path) -> Iterator[Backend]:
    be = IMPLEMENTATIONS[request.param](blobs, tmp_path)
    yield be
    run(be.close())


def _big(blobs: Blobs) -> tuple[str, bytes]:
    return max(blobs.items(), key=lambda kv: len(kv[1]))


def test_exact_bytes(backend: Backend, blobs: Blobs) -> None:
    async def go() -> None:
        for name, data in blobs.items():
            assert await backend.read(name, 0, len(data)) == data
        name, data = _big(blobs)
        assert await backend.read(name, 1000, 4096) == data[1000:5096]
    run(go())


def test_ranges_at_edges(backend: Backend, blobs: Blobs) -> None:
    name, data = _big(blobs)
    n = len(data)

    async def go() -> None:
        assert await backend.read(name, 0, 1) == data[:1]
        assert await backend.read(name, n - 1, 1) == data[-1:]
        assert await backend.read(name, n - 10, 10) == data[-10:]
        assert await backend.read(name, 0, 0) == b""
        assert await backend.read(name, n, 0) == b""  # empty range at the very end exists
        empty = next(k for k, v in blobs.items() if not v)
        assert await backend.read(empty, 0, 0) == b""
    run(go())


# (offset, size) as functions of the blob's length n.
OUTSIDE: dict[str, Callable[[int], tuple[int, int]]] = {
    "negative offset": lambda n: (-1, 1),
    "negative size": lambda n: (0, -1),
    "far too long": lambda n: (0, 1 << 30),
    "starts at EOF": lambda n: (n, 1),
    "straddles EOF": lambda n: (n - 1, 2),
    "empty beyond EOF": lambda n: (n + 1, 0),
}


@pytest.mark.parametrize("case", sorted(OUTSIDE))
def test_ranges_outside_the_blob_are_not_found(backend: Backend, blobs: Blobs,
                                               case: str) -> None:
    name, data = _big(blobs)
    offset, size = OUTSIDE[case](len(data))
    with pytest.raises(NotFoundError):
        run(backend.read(name, offset, size))
    with pytest.raises(NotFoundError):
        run(backend.read_many([RangeRequest(name, 0, 1), RangeRequest(name, offset, size)]))


def test_missing_blob_is_not_found(backend: Backend) -> None:
    with pytest.raises(NotFoundError):
        run(backend.read(MISSING, 0, 1))


@pytest.mark.parametrize("name", [
    "../x", "A" * 64, "a" * 63, "a" * 65, "", "../" + "a" * 61, "g" * 64,
    "a" * 63 + "/", "/" + "a" * 63, "a" * 63 + "\n",
])
def test_bad_blob_names_are_not_found(backend: Backend, blobs: Blobs, name: str) -> None:
    upper = next(iter(blobs)).upper()
    for bad in (name, upper):
        with pytest.raises(NotFoundError):
            run(backend.read(bad, 0, 1))
        with pytest.raises(NotFoundError):
            run(backend.read_many([RangeRequest(bad, 0, 1)]))


def test_read_many_keeps_request_order(backend: Backend, blobs: Blobs) -> None:
    names = sorted(blobs, key=lambda k: len(blobs[k]))
    big, small = names[-1], names[-2]
    reqs = [
        RangeRequest(big, 8192, 100),  # out of offset order on purpose
        RangeRequest(small, 5, 10),
        RangeRequest(big, 0, 4096),
        RangeRequest(big, 4096, 4096),  # adjacent to the previous one
        RangeRequest(big, 100, 50),  # inside an earlier range
        RangeRequest(big, 8000, 300),  # overlapping two others
        RangeRequest(big, 0, 4096),  # duplicate
        RangeRequest(big, 200_000, 0),  # empty
    ]
    got = run(backend.read_many(reqs))
    assert got == [blobs[r.blob][r.offset:r.offset + r.size] for r in reqs]
    assert run(backend.read_many([])) == []


def test_stream_many_hands_each_range_its_bytes(backend: Backend, blobs: Blobs) -> None:
    """``stream_many`` delivers what ``read_many`` returns, each range's bytes in order
    (``position`` is where the piece goes in its range), overlapping and repeated ranges each
    getting their own; its errors are ``read_many``'s."""
    names = sorted(blobs, key=lambda k: len(blobs[k]))
    big, small = names[-1], names[-2]
    reqs = [RangeRequest(big, 8192, 100), RangeRequest(small, 5, 10),
            RangeRequest(big, 0, 4096), RangeRequest(big, 4096, 4096),
            RangeRequest(big, 100, 50), RangeRequest(big, 8000, 300),
            RangeRequest(big, 0, 4096), RangeRequest(big, 200_000, 0),
            RangeRequest(big, 9000, len(blobs[big]) - 9000)]
    got: dict[int, bytearray] = {}

    def sink(i: int, pos: int, data: bytes) -> None:
        buf = got.setdefault(i, bytearray())
        assert pos == len(buf)  # in order, nothing skipped or repeated (no retry here)
        buf += data

    run(backend.stream_many(reqs, sink))
    assert [bytes(got.get(i, b"")) for i in range(len(reqs))] == \
        [blobs[r.blob][r.offset:r.offset + r.size] for r in reqs]
    with pytest.raises(NotFoundError):
        run(backend.stream_many([RangeRequest(big, 0, 10), RangeRequest(MISSING, 0, 10)],
                                lambda i, pos, data: None))


def test_read_many_errors(backend: Backend, blobs: Blobs) -> None:
    name, data = _big(blobs)
    with pytest.raises(NotFoundError):
        run(backend.read_many([RangeRequest(name, 0, 10), RangeRequest(MISSING, 0, 10)]))
    with pytest.raises(NotFoundError):  # merged with a valid neighbour, still not found
        run(backend.read_many([RangeRequest(name, len(data) - 10, 10),
                               RangeRequest(name, len(data), 10)]))


def test_many_concurrent_reads(backend: Backend, blobs: Blobs) -> None:
    name, data = _big(blobs)
    rnd = random.Random(7)
    ranges = []
    for _ in range(300):
        off = rnd.randrange(len(data))
        ranges.append((off, rnd.randrange(min(65536, len(data) - off) + 1)))

    async def go() -> list[bytes]:
        singles = [backend.read(name, o, s) for o, s in ranges]
        batches = [backend.read_many([RangeRequest(name, o, s) for o, s in ranges[i:i + 10]])
                   for i in range(0, len(ranges), 10)]
        got = await asyncio.gather(*singles)
        flat = [b for batch in await asyncio.gather(*batches) for b in batch]
        return list(got) + flat

    expected = [data[o:o + s] for o, s in ranges]
    assert run(go()) == expected + expected


def test_close_is_idempotent_and_final(backend: Backend, blobs: Blobs) -> None:
    name, data = _big(blobs)

    async def go() -> None:
        assert await backend.read(name, 0, 10) == data[:10]
        await backend.close()
        await backend.close()
        with pytest.raises(StorageError):
            await backend.read(name, 0, 10)  # never bytes from a closed backend
    run(go())
