"""Fixtures for container tests: a python3 rootfs from Debian packages, its image, mounts.

``python_rootfs`` follows RECIPES §2b: ``apt-cache depends --recurse`` (Pre-Depends kept:
python3-minimal, which provides /usr/bin/python3, is one), ``apt-get download`` and
``dpkg-deb -x`` of each package; no debootstrap, chroot or maintainer scripts. It is built once
per session (~50 MB, ~1300 entries, a few seconds with the Debian mirror reachable) and skipped,
with the reason, when the packages cannot be downloaded.

``nydus_mount`` mounts an image the way a user does (``nydusfs mount --background``) and stops
it with ``nydusfs umount``; a daemon still alive after a bounded wait is killed by its PID.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

NYDUSFS = [sys.executable, "-m", "nydusfs.cli"]

ROOTFS_PACKAGES = ["python3"]
# Not needed to run python3 and with maintainer-script-only content (as in RECIPES §2b).
SKIP_DEBS = ("perl", "libperl", "dpkg_", "tar_", "install-info", "mailcap", "mime-support",
             "media-types")
APT_TIMEOUT = 180.0


def _apt(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, cwd=cwd, capture_output=True, text=True,
                              timeout=APT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"{args[0]} {args[1]}: {exc}")


def _resolve_packages(packages: list[str]) -> list[str]:
    proc = _apt(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
                 "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *packages])
    # Virtual packages appear as "<name>" and dependency lines are indented: keep only names.
    return sorted({ln for ln in proc.stdout.splitlines() if re.match(r"^[a-z0-9]", ln)})


def build_python_rootfs(out: Path, packages: list[str] = ROOTFS_PACKAGES) -> Path:
    """Extract ``packages`` and their dependencies into ``out``; ``pytest.skip`` on failure."""
    names = _resolve_packages(packages)
    if "python3-minimal" not in names:  # apt lists missing or stale: refresh once
        update = _apt(["apt-get", "update", "-qq"])
        names = _resolve_packages(packages)
        if "python3-minimal" not in names:
            pytest.skip("cannot resolve python3's Debian dependencies (apt-get update: "
                        f"{update.stderr.strip()[-300:] or 'no error output'})")
    debs = out.parent / f"{out.name}.debs"
    debs.mkdir(parents=True, exist_ok=True)
    proc = _apt(["apt-get", "download", "-qq", *names], cwd=debs)
    if proc.returncode != 0:
        pytest.skip(f"apt-get download of {len(names)} Debian packages failed: "
                    f"{proc.stderr.strip()[-300:]}")
    out.mkdir(parents=True)
    for deb in sorted(debs.glob("*.deb")):
        if deb.name.startswith(SKIP_DEBS):
            continue
        subprocess.run(["dpkg-deb", "-x", str(deb), str(out)], check=True, timeout=60)
    for d in ("proc", "sys", "dev", "tmp", "root"):
        (out / d).mkdir(exist_ok=True)
    (out / "tmp").chmod(0o1777)
    for deb in debs.glob("*.deb"):
        deb.unlink()
    debs.rmdir()
    if not os.access(out / "usr" / "bin" / "python3", os.X_OK):
        pytest.fail(f"{out}: the extracted packages have no usr/bin/python3")
    return out


@pytest.fixture(scope="session")
def python_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A python3 rootfs extracted from Debian packages (session-wide; treat as read-only)."""
    if os.geteuid() != 0:
        pytest.skip("the python3 rootfs keeps package file ownership: needs root")
    return build_python_rootfs(tmp_path_factory.mktemp("pyroot") / "rootfs")


@pytest.fixture(scope="session")
def python_image(python_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``nydusfs build`` of ``python_rootfs``: a directory with ``bootstrap`` and ``blobs/``."""
    out = tmp_path_factory.mktemp("pyimage") / "image"
    proc = subprocess.run([*NYDUSFS, "build", str(python_rootfs), "-o", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (out / "bootstrap").is_file()
    return out


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie nobody reaped: the daemon is not our child)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class NydusMount:
    """One ``nydusfs mount --background`` of an image; ``close`` unmounts and reaps the daemon."""

    def __init__(self, bootstrap: Path, mnt: Path, config: Path | None = None) -> None:
        self.mnt = mnt
        self.pid: int | None = None
        mnt.mkdir(parents=True, exist_ok=True)
        cmd = [*NYDUSFS, "mount", str(bootstrap), str(mnt), "--background"]
        if config is not None:
            cmd += ["--config", str(config)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        m = re.search(r"daemon pid (\d+)", proc.stdout)
        if m:
            self.pid = int(m.group(1))
        if not m or not os.path.ismount(mnt):
            self.close()
            pytest.fail(f"nydusfs mount --background: no daemon pid or no mount: {proc.stdout!r}")

    def close(self) -> None:
        if os.path.ismount(self.mnt):
            proc = subprocess.run([*NYDUSFS, "umount", str(self.mnt)], capture_output=True,
                                  text=True, timeout=60, check=False)
            if proc.returncode != 0 and self.pid is not None:
                # Busy or hung: kill the daemon, then detach what is left of the mount.
                os.kill(self.pid, signal.SIGKILL)
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True,
                               timeout=30, check=False)
                pytest.fail(f"nydusfs umount {self.mnt} failed: {proc.stderr.strip()}")
        if self.pid is None:
            return
        for _ in range(200):  # the daemon exits once unmounted (bounded wait, 10 s)
            if not _alive(self.pid):
                return
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        pytest.fail(f"mount daemon {self.pid} still running after umount")


MountFactory = Callable[..., NydusMount]  # (image dir, config: Path | None = None)


@pytest.fixture
def nydus_mount(tmp_path: Path) -> Iterator[MountFactory]:
    """Mount an image directory at a fresh mountpoint; unmounted (last first) at teardown."""
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs root and /dev/fuse")
    mounts: list[NydusMount] = []

    def mount(image: Path, config: Path | None = None) -> NydusMount:
        m = NydusMount(image / "bootstrap", tmp_path / f"nydus{len(mounts)}", config)
        mounts.append(m)
        return m

    yield mount
    for m in reversed(mounts):
        m.close()
