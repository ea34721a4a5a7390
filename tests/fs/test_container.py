"""A container runs from a nydusfs mount: runc on overlay(nydusfs lower, tmpfs upper), and on
the FUSE mount itself as a read-only root (RECIPES §3).

The rootfs is python3 and its dependencies extracted from Debian packages (``python_rootfs`` in
conftest.py); the container imports a few stdlib modules, which reads the interpreter, libc,
libpython and a few dozen .py files through FUSE, and prints one line.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import MountFactory

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                       reason="needs root and /dev/fuse"),
    pytest.mark.skipif(shutil.which("runc") is None,
                       reason="runc is not installed (`make setup` installs it)"),
    pytest.mark.timeout(180),
]

PROGRAM = 'import json, email, http.client; print("ready")'
RUN_TIMEOUT = 60.0
_ids = itertools.count()


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30,
                          check=False)
    assert proc.returncode == 0, f"mount {' '.join(args)}: {proc.stderr.strip()}"


def _umount(target: Path) -> None:
    if not os.path.ismount(target):
        return
    proc = subprocess.run(["umount", str(target)], capture_output=True, text=True, timeout=30,
                          check=False)
    if proc.returncode != 0:  # busy: detach it so the FUSE mount below can still go
        subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30,
                       check=False)
        pytest.fail(f"umount {target}: {proc.stderr.strip()}")


class Runc:
    """``runc`` with its state directory in the test's tmp dir; containers deleted at close."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.ids: list[str] = []

    def _cmd(self, *args: str) -> list[str]:
        return ["runc", "--root", str(self.state), *args]

    def bundle(self, path: Path, root: Path, readonly: bool, args: list[str]) -> Path:
        path.mkdir(parents=True)
        subprocess.run(self._cmd("spec", "--bundle", str(path)), check=True, timeout=30)
        config = json.loads((path / "config.json").read_text())
        config["process"]["terminal"] = False  # the default (true) needs a TTY
        config["process"]["args"] = args
        config["root"] = {"path": str(root), "readonly": readonly}
        (path / "config.json").write_text(json.dumps(config, indent=1))
        return path

    def run(self, bundle: Path) -> subprocess.CompletedProcess[str]:
        cid = f"nydusfs-test-{os.getpid()}-{next(_ids)}"
        self.ids.append(cid)
        try:
            return subprocess.run(self._cmd("run", "--bundle", str(bundle), cid),
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            subprocess.run(self._cmd("kill", cid, "KILL"), capture_output=True, timeout=30,
                           check=False)
            pytest.fail(f"runc run {cid} did not finish in {RUN_TIMEOUT:.0f} s")

    def close(self) -> None:
        for cid in self.ids:
            subprocess.run(self._cmd("delete", "--force", cid), capture_output=True,
                           timeout=30, check=False)
        shutil.rmtree(self.state, ignore_errors=True)


@pytest.fixture
def runc(tmp_path: Path) -> Iterator[Runc]:
    r = Runc(tmp_path / "runc-state")
    yield r
    r.close()


class Overlay:
    """overlayfs: ``lower`` below a tmpfs holding ``upper`` and ``work``, merged at ``merged``."""

    def __init__(self, lower: Path, base: Path) -> None:
        self.tmpfs = base / "rw"
        self.merged = base / "merged"
        self.tmpfs.mkdir(parents=True)
        self.merged.mkdir()
        _mount("-t", "tmpfs", "-o", "size=256m", "tmpfs", str(self.tmpfs))
        self.upper = self.tmpfs / "upper"
        self.upper.mkdir()
        (self.tmpfs / "work").mkdir()
        _mount("-t", "overlay", "overlay", "-o",
               f"lowerdir={lower},upperdir={self.upper},workdir={self.tmpfs / 'work'}",
               str(self.merged))

    def close(self) -> None:
        _umount(self.merged)  # first the overlay, then its upper: the FUSE lower goes last
        _umount(self.tmpfs)


def test_runc_on_overlay_with_nydusfs_lower(python_image: Path, nydus_mount: MountFactory,
                                            runc: Runc, tmp_path: Path) -> None:
    lower = nydus_mount(python_image)  # torn down after the overlay (fixture order)
    before = sorted(os.listdir(lower.mnt))
    overlay = Overlay(lower.mnt, tmp_path / "ovl")
    try:
        bundle = runc.bundle(tmp_path / "bundle", overlay.merged, readonly=False,
                             args=["/usr/bin/python3", "-c", PROGRAM])
        proc = runc.run(bundle)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "ready\n", (proc.stdout, proc.stderr)
        # Anything the container wrote (python's __pycache__) went to the tmpfs upper.
        (overlay.merged / "written-by-test").write_text("x")
        assert (overlay.upper / "written-by-test").read_text() == "x"
        assert sorted(os.listdir(lower.mnt)) == before
    finally:
        overlay.close()


def test_runc_directly_on_nydusfs_readonly_root(python_image: Path, nydus_mount: MountFactory,
                                                runc: Runc, tmp_path: Path) -> None:
    mnt = nydus_mount(python_image).mnt
    bundle = runc.bundle(tmp_path / "bundle", mnt, readonly=True,
                         args=["/usr/bin/python3", "-B", "-c", PROGRAM])
    proc = runc.run(bundle)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ready\n", (proc.stdout, proc.stderr)
