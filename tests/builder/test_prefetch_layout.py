"""Blob layout: prefetch files first (in list order), then each directory's files together."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import pytest

from nydusfs.format.reader import Bootstrap
from nydusfs.verify import check_image

from .helpers import MiB, build_image, chunk_extents, read_file, run_cli, write_tree


def _rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    files: dict[str | bytes, bytes] = {
        "aaa/first.bin": _rand(1, 500_000),  # first by name: would lead without a prefetch list
        "bin/tool": _rand(2, 2 * MiB + MiB // 2),
        "usr/lib/libx.so": _rand(3, 300_000),
        "usr/lib/liby.so": _rand(4, 1000),
        "etc/a.conf": _rand(5, 2000),
        "etc/b.conf": _rand(6, 2000),
        "etc/sub/c.conf": _rand(7, 2000),
        "zzz/last.bin": _rand(8, 10_000),
    }
    # Two directories of many small files; m1's subdirectory sorts in the middle of its files.
    for base, d in ((100, "m1"), (200, "m2")):
        for i in range(50):
            files[f"{d}/f{i:02d}"] = _rand(base + i, 3000 + i)
    for i in range(10):
        files[f"m1/f25sub/g{i:02d}"] = _rand(900 + i, 2500)
    write_tree(root, files)
    os.symlink("usr/lib", root / "lib")
    os.symlink("/etc", root / "abs_etc")
    return root


def _all_extents(boot: Bootstrap) -> list[tuple[int, int]]:
    return sorted((c.compressed_offset, c.compressed_size) for c in boot.chunks())


def _is_run(extents: list[tuple[int, int]]) -> bool:
    return all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(extents))


def test_prefetch_files_lead_the_blob_in_list_order(src: Path, tmp_path: Path) -> None:
    order = [b"/bin/tool", b"lib/libx.so", b"abs_etc/sub/../b.conf", b"/etc", b"/no/such/file"]
    res = build_image([src], tmp_path / "out", prefetch=order)
    assert any("no/such/file" in w for w in res.warnings)
    assert res.prefetch_files == 5
    with Bootstrap.open(tmp_path / "out" / "bootstrap") as boot:
        expect = ["/bin/tool", "/usr/lib/libx.so", "/etc/b.conf", "/etc/a.conf",
                  "/etc/sub/c.conf"]
        assert boot.prefetch() == [boot.resolve(p).ino for p in expect]
        lead = [e for p in expect for e in chunk_extents(boot, p)]
        everything = _all_extents(boot)
        # The prefetch files' chunks are exactly the first chunks of the blob, in list order.
        assert lead == everything[: len(lead)]
        assert lead[0][0] == 0 and _is_run(lead)
        check_image(boot, tmp_path / "out" / "blobs")
        assert read_file(boot, tmp_path / "out" / "blobs", "/usr/lib/libx.so") == _rand(3, 300_000)


def test_without_prefetch_the_first_directory_leads(src: Path, tmp_path: Path) -> None:
    res = build_image([src], tmp_path / "out")
    assert res.prefetch_files == 0 and res.warnings == []
    with Bootstrap.open(tmp_path / "out" / "bootstrap") as boot:
        assert boot.prefetch() == []
        assert chunk_extents(boot, "/aaa/first.bin")[0][0] == 0


def test_files_of_one_directory_are_adjacent(src: Path, tmp_path: Path) -> None:
    build_image([src], tmp_path / "out", prefetch=[b"/m2/f30"])
    with Bootstrap.open(tmp_path / "out" / "bootstrap") as boot:
        everything = _all_extents(boot)
        for d, names in (("m1", [f"f{i:02d}" for i in range(50)]),
                         ("m2", [f"f{i:02d}" for i in range(50) if i != 30]),
                         ("m1/f25sub", [f"g{i:02d}" for i in range(10)])):
            ext = [e for n in names for e in chunk_extents(boot, f"{d}/{n}")]
            # In name order, back to back, with nothing else in between.
            assert _is_run(ext), d
            start = everything.index(ext[0])
            assert everything[start : start + len(ext)] == ext, d
        # m2/f30 went first (prefetch) and is not repeated inside m2's run.
        assert chunk_extents(boot, "/m2/f30")[0][0] == 0


def test_cli_prefetch_file_with_comments_and_missing_paths(src: Path, tmp_path: Path) -> None:
    listing = tmp_path / "prefetch.txt"
    listing.write_bytes(b"# hot files\n\n/bin/tool\n  /usr/lib/liby.so  \n/gone\n")
    res = run_cli("build", src, "-o", tmp_path / "out", "--prefetch", listing)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("nydusfs: warning:")]
    assert len(warnings) == 1 and "/gone" in warnings[0]
    with Bootstrap.open(tmp_path / "out" / "bootstrap") as boot:
        assert boot.prefetch() == [boot.resolve("/bin/tool").ino,
                                   boot.resolve("/usr/lib/liby.so").ino]
    missing = run_cli("build", src, "-o", tmp_path / "out2", "--prefetch", tmp_path / "nope")
    assert missing.returncode == 1 and "nydusfs: error:" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_prefetch_paths_through_symlinks_loops_and_files(src: Path, tmp_path: Path) -> None:
    """Prefetch paths are resolved inside the image: symlinks followed (absolute ones from the
    image root), a symlink loop or a path through a regular file is a warning, not a failure."""
    os.symlink("loop-b", src / "loop-a")
    os.symlink("loop-a", src / "loop-b")
    os.symlink("/bin", src / "abs-bin")
    res = build_image([src], tmp_path / "out",
                      prefetch=[b"/loop-a/x", b"/bin/tool/x", b"/abs-bin/tool"])
    assert len(res.warnings) == 2
    assert any("loop-a" in w for w in res.warnings)
    assert any("bin/tool/x" in w for w in res.warnings)
    with Bootstrap.open(tmp_path / "out" / "bootstrap") as boot:
        assert boot.prefetch() == [boot.resolve("/bin/tool").ino]
