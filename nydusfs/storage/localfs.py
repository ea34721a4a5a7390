"""The ``localfs`` backend: blobs are files named by their sha256 in one directory.

The default backend (an image's ``blobs/`` beside its bootstrap, or a NAS mount). Reads are
``os.pread`` on a per-blob file descriptor, run in a worker thread so a slow disk never blocks
the event loop that also serves FUSE. This module never decodes or verifies bytes, and never
builds a path from a name that :func:`~nydusfs.storage.base.check_range` has not accepted.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nydusfs.errors import ConfigError, NotFoundError, UnavailableError
from nydusfs.storage.base import Backend, RangeRequest, check_range
from nydusfs.storage.ranges import coalesce, scatter

if TYPE_CHECKING:
    from nydusfs.config import BackendConfig

__all__ = ["LocalFsBackend", "from_config"]

# Errors meaning "this blob is not here" rather than "the disk is unwell right now".
_NOT_FOUND_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP})


class LocalFsBackend(Backend):
    """Reads ``<dir>/<sha256 hex>`` files; see ``storage.base`` for the contract.

    One descriptor per blob, opened on first use and kept until :meth:`close`: images have a
    handful of blobs and chunks are read millions of times, so reopening would dominate.
    """

    name = "localfs"

    def __init__(self, dir: Path) -> None:
        self.dir = Path(dir)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()  # guards _fds/_closed; taken in worker threads
        self._closed = False

    async def read(self, blob: str, offset: int, size: int) -> bytes:
        check_range(blob, offset, size)
        return await asyncio.to_thread(self._pread, blob, offset, size)

    async def read_many(self, requests: Sequence[RangeRequest]) -> list[bytes]:
        """One ``pread`` per maximal run of adjacent or overlapping ranges of a blob."""
        for r in requests:
            check_range(r.blob, r.offset, r.size)
        runs = coalesce(requests)
        if len(runs) == 1:  # the common case (one file's chunks): no gather task needed
            run = runs[0]
            datas = [await asyncio.to_thread(self._pread, run.blob, run.offset, run.size)]
        else:
            datas = list(await asyncio.gather(*(asyncio.to_thread(
                self._pread, run.blob, run.offset, run.size) for run in runs)))
        return scatter(requests, runs, datas)

    async def close(self) -> None:
        with self._lock:
            self._closed = True
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)

    # -- worker-thread side ---------------------------------------------------------------

    def _pread(self, blob: str, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes at ``offset`` (blocking; runs in a worker thread).

        The single place bytes come off the disk, so tests can count reads by overriding it.
        """
        fd = self._fd(blob)
        try:
            if size == 0:
                if offset > os.fstat(fd).st_size:
                    raise NotFoundError(f"{blob}: offset {offset} beyond end of blob")
                return b""
            parts: list[bytes] = []
            got = 0
            while got < size:  # pread may return short (signals, NFS); only b"" means EOF
                part = os.pread(fd, size - got, offset + got)
                if not part:
                    raise NotFoundError(
                        f"{blob}: range {offset}+{size} beyond end of blob ({offset + got})")
                parts.append(part)
                got += len(part)
        except OSError as exc:
            raise UnavailableError(f"{blob}: read failed at {offset}+{size}: {exc}") from exc
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _fd(self, blob: str) -> int:
        with self._lock:
            if self._closed:
                raise UnavailableError(f"{blob}: backend {self.dir} is closed")
            fd = self._fds.get(blob)
            if fd is not None:
                return fd
            path = self.dir / blob
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno in _NOT_FOUND_ERRNOS:
                    raise NotFoundError(f"{blob}: no such blob in {self.dir}") from exc
                raise UnavailableError(f"{blob}: cannot open {path}: {exc}") from exc
            try:
                is_file = stat.S_ISREG(os.fstat(fd).st_mode)
            except OSError as exc:
                os.close(fd)
                raise UnavailableError(f"{blob}: cannot stat {path}: {exc}") from exc
            if not is_file:
                os.close(fd)
                raise NotFoundError(f"{blob}: {path} is not a regular file")
            self._fds[blob] = fd
            return fd


def from_config(cfg: BackendConfig, image_dir: Path | None) -> LocalFsBackend:
    """Registry factory: ``backend.localfs.dir``, else ``blobs/`` beside the bootstrap."""
    if cfg.localfs.dir is not None:
        return LocalFsBackend(cfg.localfs.dir)
    if image_dir is None:
        raise ConfigError("backend.localfs.dir: required (no image directory to default to)")
    return LocalFsBackend(image_dir / "blobs")
