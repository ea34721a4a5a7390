"""The builder holds metadata, not data: memory does not grow with file size.

A build reads every byte of its input, but at most a window of chunks is in flight between the
reader and the hashing/compressing workers. These tests measure Python allocations with
tracemalloc (deterministic, unlike RSS or time) while building inputs far larger than the
window.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
import tracemalloc
from pathlib import Path

from nydusfs.builder import BuildOptions, build
from nydusfs.format.reader import Bootstrap
from nydusfs.verify import check_image

MiB = 1 << 20
FILE_SIZE = 96 * MiB
LIMIT = 40 * MiB  # window (2 x workers + 2 chunks) + spool buffers, with room to spare


def _incompressible_file(path: Path, size: int) -> None:
    """Distinct chunks that zstd cannot shrink, written without holding them all."""
    rng = random.Random(1234)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(rng.randbytes(MiB))


def _peak_while(fn: object) -> int:
    assert callable(fn)
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_directory_build_memory_does_not_grow_with_file_size(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _incompressible_file(src / "big", FILE_SIZE)
    out = tmp_path / "out"
    peak = _peak_while(lambda: build([str(src)], out, BuildOptions(workers=2)))
    assert peak < LIMIT, f"{peak / MiB:.1f} MiB traced to build a {FILE_SIZE // MiB} MiB file"
    with Bootstrap.open(out / "bootstrap") as boot:
        assert boot.resolve("big").size == FILE_SIZE
        assert boot.chunk_count == FILE_SIZE // MiB
        check_image(boot, out / "blobs")


def test_tar_build_memory_does_not_grow_with_member_size(tmp_path: Path) -> None:
    big = tmp_path / "big"
    _incompressible_file(big, FILE_SIZE)
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w") as tar:
        tar.add(big, arcname="big")
        tar.addfile(tarfile.TarInfo("small"), io.BytesIO(b""))
    os.unlink(big)
    out = tmp_path / "out"
    peak = _peak_while(lambda: build([str(layer)], out, BuildOptions(workers=2)))
    assert peak < LIMIT, f"{peak / MiB:.1f} MiB traced to build a {FILE_SIZE // MiB} MiB member"
    with Bootstrap.open(out / "bootstrap") as boot:
        assert boot.resolve("big").size == FILE_SIZE
        check_image(boot, out / "blobs")
