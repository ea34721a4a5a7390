"""Real FUSE mounts of built images: what a reader sees equals the source tree.

Runs ``nydusfs mount --background`` as a user would, reads through the kernel, and stops the
daemon with ``nydusfs umount`` (by its mountpoint; the daemon's PID is checked gone).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from treegen import snapshot_tree

from nydusfs.builder import BuildOptions, build
from nydusfs.format.reader import Bootstrap

from .conftest import MountFactory

NYDUSFS = [sys.executable, "-m", "nydusfs.cli"]

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs root and /dev/fuse"
)


def _run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NYDUSFS, *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)


def _build(src: Path, out: Path) -> Path:
    build([str(src)], out, BuildOptions())
    return out


def test_mounted_tree_equals_source(
    full_tree: Path, tmp_path: Path, nydus_mount: MountFactory
) -> None:
    image = _build(full_tree, tmp_path / "image")
    m = nydus_mount(image)
    want = snapshot_tree(full_tree)
    got = snapshot_tree(m.mnt)
    assert sorted(got) == sorted(want)
    diffs = {p: {k: (got[p].get(k), v) for k, v in want[p].items() if got[p].get(k) != v}
             for p in want}
    diffs = {p: d for p, d in diffs.items() if d}
    assert not diffs, list(diffs.items())[:5]


def _small_tree(root: Path) -> None:
    root.mkdir()
    (root / "a").write_bytes(os.urandom(3 << 20))
    (root / "b").write_bytes(b"hello\n" * 1000)
    (root / "sub").mkdir()
    (root / "sub" / "c").write_bytes(os.urandom(100_000))


def test_corrupt_chunk_gives_eio_for_that_file_only(
    tmp_path: Path, nydus_mount: MountFactory
) -> None:
    _small_tree(tmp_path / "src")
    image = _build(tmp_path / "src", tmp_path / "image")
    with Bootstrap.open(image / "bootstrap") as boot:
        ref = boot.file_chunks(boot.resolve("a"))[1]
        blob = image / "blobs" / boot.blob(ref.chunk.blob_index).hex
    data = bytearray(blob.read_bytes())
    data[ref.chunk.compressed_offset + 10] ^= 0xFF
    blob.write_bytes(bytes(data))
    m = nydus_mount(image)
    with open(m.mnt / "a", "rb") as f:
        assert f.read(4096) == (tmp_path / "src" / "a").read_bytes()[:4096]  # chunk 0 is fine
        f.seek(ref.file_offset)
        with pytest.raises(OSError) as info:
            f.read(4096)
        assert info.value.errno == errno.EIO
    assert (m.mnt / "b").read_bytes() == (tmp_path / "src" / "b").read_bytes()
    assert (m.mnt / "sub" / "c").read_bytes() == (tmp_path / "src" / "sub" / "c").read_bytes()


def test_read_only(tmp_path: Path, nydus_mount: MountFactory) -> None:
    _small_tree(tmp_path / "src")
    m = nydus_mount(_build(tmp_path / "src", tmp_path / "image"))
    def append() -> None:
        with open(m.mnt / "b", "ab") as f:
            f.write(b"x")

    for action in (append, lambda: (m.mnt / "new").write_bytes(b"x"),
                   lambda: os.mkdir(m.mnt / "d"), lambda: os.unlink(m.mnt / "b")):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == errno.EROFS


def test_background_mount_reports_errors(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "bad").write_bytes(b"not a bootstrap")
    proc = _run("mount", tmp_path / "bad", tmp_path / "mnt", "--background")
    assert proc.returncode == 1
    assert "nydusfs: error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_foreground_mount_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    _small_tree(tmp_path / "src")
    image = _build(tmp_path / "src", tmp_path / "image")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([*NYDUSFS, "mount", str(image / "bootstrap"), str(mnt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(400):  # bounded wait for the mount (20 s)
            if os.path.ismount(mnt) or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert os.path.ismount(mnt), proc.stderr.read() if proc.stderr else ""
        assert (mnt / "b").read_bytes() == (tmp_path / "src" / "b").read_bytes()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert not os.path.ismount(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)


def _wait_for(cond: Callable[[], bool], what: str, seconds: float = 60) -> None:
    for _ in range(int(seconds / 0.05)):  # bounded poll
        if cond():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _stat(mnt: Path) -> dict[str, Any]:
    proc = _run("stat", mnt, "--json")
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_prefetch_all_into_cache_survives_losing_the_blobs(tmp_path: Path,
                                                            nydus_mount: MountFactory) -> None:
    _small_tree(tmp_path / "src")
    image = _build(tmp_path / "src", tmp_path / "image")
    cfg = tmp_path / "mount.yaml"
    port = _free_port()
    cfg.write_text(
        "backend: localfs\n"
        f"cache: {{enabled: true, dir: {tmp_path / 'cache'}, quota: 1GiB}}\n"
        "prefetch: {all: true, bandwidth: 0, concurrency: 2}\n"
        f"metrics: 127.0.0.1:{port}\n"
        f"access_trace: {tmp_path / 'trace'}\n")
    m = nydus_mount(image, cfg)
    _wait_for(lambda: _stat(m.mnt).get("prefetch", {}).get("state") == "done", "prefetch")
    status = _stat(m.mnt)
    assert status["prefetch"]["done_chunks"] == status["prefetch"]["total_chunks"] > 0
    shutil.rmtree(image / "blobs")  # the backend is gone; the cache must serve everything
    for name in ("a", "b", "sub/c"):
        assert (m.mnt / name).read_bytes() == (tmp_path / "src" / name).read_bytes()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert "nydusfs_read_bytes_total" in text and "nydusfs_prefetch_chunks" in text
    m.close()
    assert (tmp_path / "trace").read_bytes().splitlines() == [b"/a", b"/b", b"/sub/c"]
    # A second mount of the same image reads from the cache (blobs still gone).
    m2 = nydus_mount(image, _no_prefetch(tmp_path))
    assert (m2.mnt / "sub" / "c").read_bytes() == (tmp_path / "src" / "sub" / "c").read_bytes()
    assert _stat(m2.mnt)["read"]["store_hits"] >= 1


def _no_prefetch(tmp_path: Path) -> Path:
    out = tmp_path / "mount2.yaml"
    out.write_text("backend: localfs\n"
                   f"cache: {{enabled: true, dir: {tmp_path / 'cache'}, quota: 1GiB}}\n")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_reading_one_file_fetches_only_its_chunks(
    tmp_path: Path, nydus_mount: MountFactory
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(os.urandom(2 << 20))
    image = _build(src, tmp_path / "image")
    cfg = tmp_path / "m.yaml"
    cfg.write_text("read: {merge_window: 0, readahead_chunks: 0}\n")
    m = nydus_mount(image, cfg)
    assert (m.mnt / "f3").read_bytes() == (src / "f3").read_bytes()
    status = _stat(m.mnt)
    with Bootstrap.open(image / "bootstrap") as boot:
        mine = sum(r.chunk.compressed_size for r in boot.file_chunks(boot.resolve("f3")))
    assert status["backend_counters"]["bytes_read"] == mine
    assert status["read"]["chunks_fetched"] == 2


def test_stat_without_a_daemon_is_a_clear_error(tmp_path: Path) -> None:
    proc = _run("stat", tmp_path)
    assert proc.returncode == 1 and "no nydusfs daemon" in proc.stderr


def _ls_lr(root: Path) -> str:
    """`ls -lR` as a user compares trees. Left out: the `total` lines, which add up allocated
    blocks (an image stores sizes, not how a filesystem allocated them: sparse files, ext4's
    4 KiB blocks), and `.`/`..` of the top (`..` is the mountpoint's parent)."""
    proc = subprocess.run(["ls", "-lRAn", "--time-style=full-iso", "."], cwd=root,
                          capture_output=True, timeout=120, check=False)
    lines = proc.stdout.decode("utf-8", "backslashreplace").splitlines()
    return "\n".join(ln for ln in lines if not ln.startswith("total "))


def test_ls_lr_output_equals_the_source(full_tree: Path, tmp_path: Path,
                                        nydus_mount: MountFactory) -> None:
    m = nydus_mount(_build(full_tree, tmp_path / "image"))
    want, got = _ls_lr(full_tree), _ls_lr(m.mnt)
    assert want.count("\n") > 100
    assert got == want


def test_32_concurrent_readers_get_the_right_bytes(
    tmp_path: Path, nydus_mount: MountFactory
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(5 << 20))
    m = nydus_mount(_build(src, tmp_path / "image"))
    want = {i: (src / f"f{i}").read_bytes() for i in range(4)}

    def reader(k: int) -> bool:
        i, off = k % 4, (k * 700_001) % (4 << 20)
        with open(m.mnt / f"f{i}", "rb") as f:
            f.seek(off)
            return f.read(1 << 20) == want[i][off : off + (1 << 20)]

    with ThreadPoolExecutor(32) as pool:
        assert all(pool.map(reader, range(32)))
