"""Real FUSE mounts of built images: what a reader sees equals the source tree.

Runs ``nydusfs mount --background`` as a user would, reads through the kernel, and stops the
daemon with ``nydusfs umount`` (by its mountpoint; the daemon's PID is checked gone).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from treegen import snapshot_tree

from nydusfs.builder import BuildOptions, build
from nydusfs.format.reader import Bootstrap

NYDUSFS = [sys.executable, "-m", "nydusfs.cli"]

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs root and /dev/fuse"
)


def _run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NYDUSFS, *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)


class Mounted:
    def __init__(self, image: Path, mnt: Path) -> None:
        self.image = image
        self.mnt = mnt
        mnt.mkdir(parents=True, exist_ok=True)
        proc = _run("mount", image / "bootstrap", mnt, "--background")
        assert proc.returncode == 0, proc.stderr
        m = re.search(r"daemon pid (\d+)", proc.stdout)
        assert m, proc.stdout
        self.pid = int(m.group(1))
        assert os.path.ismount(mnt)

    def close(self) -> None:
        if os.path.ismount(self.mnt):
            proc = _run("umount", self.mnt)
            assert proc.returncode == 0, proc.stderr
        for _ in range(200):  # the daemon exits once unmounted (bounded wait, 10 s)
            if not _alive(self.pid):
                return
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        pytest.fail(f"mount daemon {self.pid} still running after umount")


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie nobody reaped: the daemon is not our child)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.fixture
def mount_image(tmp_path: Path) -> Iterator[Callable[[Path], Mounted]]:
    mounts: list[Mounted] = []

    def mount(image: Path) -> Mounted:
        m = Mounted(image, tmp_path / f"mnt{len(mounts)}")
        mounts.append(m)
        return m

    yield mount
    for m in mounts:
        m.close()


def _build(src: Path, out: Path) -> Path:
    build([str(src)], out, BuildOptions())
    return out


MountFn = Callable[[Path], "Mounted"]


def test_mounted_tree_equals_source(full_tree: Path, tmp_path: Path, mount_image: MountFn) -> None:
    image = _build(full_tree, tmp_path / "image")
    m = mount_image(image)
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


def test_corrupt_chunk_gives_eio_for_that_file_only(tmp_path: Path, mount_image: MountFn) -> None:
    _small_tree(tmp_path / "src")
    image = _build(tmp_path / "src", tmp_path / "image")
    with Bootstrap.open(image / "bootstrap") as boot:
        ref = boot.file_chunks(boot.resolve("a"))[1]
        blob = image / "blobs" / boot.blob(ref.chunk.blob_index).hex
    data = bytearray(blob.read_bytes())
    data[ref.chunk.compressed_offset + 10] ^= 0xFF
    blob.write_bytes(bytes(data))
    m = mount_image(image)
    with open(m.mnt / "a", "rb") as f:
        assert f.read(4096) == (tmp_path / "src" / "a").read_bytes()[:4096]  # chunk 0 is fine
        f.seek(ref.file_offset)
        with pytest.raises(OSError) as info:
            f.read(4096)
        assert info.value.errno == errno.EIO
    assert (m.mnt / "b").read_bytes() == (tmp_path / "src" / "b").read_bytes()
    assert (m.mnt / "sub" / "c").read_bytes() == (tmp_path / "src" / "sub" / "c").read_bytes()


def test_read_only(tmp_path: Path, mount_image: MountFn) -> None:
    _small_tree(tmp_path / "src")
    m = mount_image(_build(tmp_path / "src", tmp_path / "image"))
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
