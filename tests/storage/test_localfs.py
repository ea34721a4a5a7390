"""``localfs`` specifics the conformance suite cannot see: merged preads, fds, errno mapping."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from pathlib import Path

import pytest

from nydusfs.errors import NotFoundError, UnavailableError
from nydusfs.storage import RangeRequest
from nydusfs.storage.localfs import LocalFsBackend

from .helpers import blob_name, run, write_blobs


class PreadCounting(LocalFsBackend):
    """Records every ``pread`` run (blob, offset, size) and the thread it ran on."""

    def __init__(self, dir: Path) -> None:
        super().__init__(dir)
        self.preads: list[tuple[str, int, int]] = []
        self.threads: set[int] = set()

    def _pread(self, blob: str, offset: int, size: int) -> bytes:
        self.preads.append((blob, offset, size))
        self.threads.add(threading.get_ident())
        return super()._pread(blob, offset, size)


@pytest.fixture
def data() -> bytes:
    return bytes(range(256)) * 1024


@pytest.fixture
def backend(tmp_path: Path, data: bytes) -> PreadCounting:
    other = b"x" * 1000
    return PreadCounting(write_blobs(tmp_path, {blob_name(data): data, blob_name(other): other}))


def test_adjacent_and_overlapping_ranges_become_one_pread(backend: PreadCounting,
                                                          data: bytes) -> None:
    b = blob_name(data)
    reqs = [RangeRequest(b, 8192, 4096), RangeRequest(b, 0, 4096), RangeRequest(b, 4096, 4096),
            RangeRequest(b, 6000, 100),  # inside
            RangeRequest(b, 12000, 1000),  # overlaps the end of the run
            RangeRequest(b, 20000, 10),  # a gap: a second read
            RangeRequest(b, 20010, 10)]  # adjacent to that
    got = run(backend.read_many(reqs))
    assert got == [data[r.offset:r.offset + r.size] for r in reqs]
    assert sorted(backend.preads) == [(b, 0, 13000), (b, 20000, 20)]


def test_ranges_of_different_blobs_are_never_merged(backend: PreadCounting,
                                                    data: bytes) -> None:
    other = blob_name(b"x" * 1000)
    b = blob_name(data)
    got = run(backend.read_many([RangeRequest(b, 0, 10), RangeRequest(other, 10, 10),
                                 RangeRequest(b, 10, 10), RangeRequest(other, 0, 10)]))
    assert got == [data[:10], b"x" * 10, data[10:20], b"x" * 10]
    assert sorted(backend.preads) == sorted([(b, 0, 20), (other, 0, 20)])


def test_reads_run_off_the_event_loop_thread(backend: PreadCounting, data: bytes) -> None:
    run(backend.read(blob_name(data), 0, 10))
    assert backend.threads and threading.get_ident() not in backend.threads


def test_one_fd_per_blob_opened_lazily_and_closed(backend: PreadCounting, data: bytes) -> None:
    def blob_fds() -> list[str]:
        targets = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own fd, already closed
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        return sorted(t for t in targets if t.startswith(str(backend.dir)))

    assert blob_fds() == []  # constructing opened nothing

    async def go() -> None:
        for i in range(50):
            await backend.read(blob_name(data), i, 1)
        assert blob_fds() == [str(backend.dir / blob_name(data))]
        await backend.read(blob_name(b"x" * 1000), 0, 1)
        assert len(blob_fds()) == 2
        await backend.close()
    run(go())
    assert blob_fds() == []


def test_io_error_is_unavailable(backend: PreadCounting, data: bytes,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(fd: int, size: int, offset: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pread", eio)
    with pytest.raises(UnavailableError) as info:
        run(backend.read(blob_name(data), 0, 10))
    assert isinstance(info.value.__cause__, OSError)


def test_short_preads_are_completed(backend: PreadCounting, data: bytes,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pread

    def dribble(fd: int, size: int, offset: int) -> bytes:
        return real(fd, min(size, 7), offset)  # like a signal-interrupted read

    monkeypatch.setattr(os, "pread", dribble)
    assert run(backend.read(blob_name(data), 3, 100)) == data[3:103]


def test_unreadable_blob_is_unavailable(tmp_path: Path, data: bytes,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    write_blobs(tmp_path, {blob_name(data): data})
    real_open = os.open

    def eacces(path: object, flags: int, *args: int) -> int:
        if str(path).endswith(blob_name(data)):
            raise OSError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", eacces)
    with pytest.raises(UnavailableError):
        run(LocalFsBackend(tmp_path).read(blob_name(data), 0, 1))


def test_directory_or_missing_dir_is_not_found(tmp_path: Path) -> None:
    name = "ab" * 32
    (tmp_path / name).mkdir()
    with pytest.raises(NotFoundError):
        run(LocalFsBackend(tmp_path).read(name, 0, 1))
    with pytest.raises(NotFoundError):
        run(LocalFsBackend(tmp_path / "nonexistent").read(name, 0, 1))


def test_symlink_escape_is_not_followed_by_name(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"top secret")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    with pytest.raises(NotFoundError):  # the name check happens before any path is built
        run(LocalFsBackend(blobs).read("../secret", 0, 3))
