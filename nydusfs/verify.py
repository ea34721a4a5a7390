"""Whole-image verification for ``nydusfs check``: bootstrap structure, Merkle tree, blobs.

Sits above ``format`` (it reads blob files from a directory); the filesystem verifies chunk by
chunk as it reads, this checks everything at once so a publisher can vouch for an image before
pushing it. Stops at the first problem with an error naming it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from nydusfs.errors import FormatError, IntegrityError
from nydusfs.format.chunk import decode
from nydusfs.format.reader import Bootstrap

__all__ = ["check_image"]


def check_image(boot: Bootstrap, blob_dir: Path | None = None) -> dict[str, Any]:
    """Validate ``boot`` and, with ``blob_dir``, every blob's sha256 and every chunk's digest."""
    report: dict[str, Any] = dict(boot.check())
    report["root_digest"] = boot.header.root_digest.hex()
    if blob_dir is None:
        return report
    by_blob: dict[int, list[int]] = {}
    for c in boot.chunks():
        by_blob.setdefault(c.blob_index, []).append(c.index)
    verified_bytes = 0
    for blob in boot.blobs():
        path = blob_dir / blob.hex
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise FormatError(f"blob {blob.hex}: cannot open {path}: {exc.strerror}") from exc
        try:
            size = os.fstat(fd).st_size
            if size != blob.size:
                raise IntegrityError(f"blob {blob.hex}: {size} bytes, bootstrap says {blob.size}")
            sha = hashlib.sha256()
            while data := os.read(fd, 1 << 20):
                sha.update(data)
            if sha.digest() != blob.sha256:
                raise IntegrityError(f"blob {blob.hex}: sha256 mismatch")
            for ci in by_blob.get(blob.index, []):
                c = boot.chunk(ci)
                payload = os.pread(fd, c.compressed_size, c.compressed_offset)
                decode(payload, c.flags, c.uncompressed_size, c.digest)
                verified_bytes += c.uncompressed_size
        finally:
            os.close(fd)
    report["chunks_verified"] = sum(len(v) for v in by_blob.values())
    report["bytes_verified"] = verified_bytes
    return report
