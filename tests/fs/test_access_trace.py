"""The access trace of a real mount lists every file read, however the kernel found it.

The trace (config ``access_trace``) becomes a ``--prefetch`` list, so a file missing from it is
fetched on demand at the next start instead of up front. The kernel reaches a file either by a
LOOKUP or, once a directory was listed with attributes (READDIRPLUS, which the adapter sends
while readers stat what they list), from the listing alone: no LOOKUP at all. Both must land
in the trace, with the path the file has in the image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nydusfs.builder import BuildOptions, build
from nydusfs.builder.build import read_prefetch_file
from nydusfs.format.reader import Bootstrap

from .conftest import MountFactory

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs root and /dev/fuse"
)


def _tree(src: Path) -> None:
    for d in ("stat-me", "lib/python", "deep/a/b/c"):
        (src / d).mkdir(parents=True)
    for i in range(8):
        (src / "stat-me" / f"s{i}").write_bytes(b"s" * (i + 1))
        (src / "lib" / "python" / f"m{i}.py").write_bytes(f"x = {i}\n".encode() * 100)
    (src / "deep" / "a" / "b" / "c" / "leaf").write_bytes(b"leaf" * 1000)
    (src / "top").write_bytes(b"top\n")
    os.link(src / "top", src / "lib" / "top-again")  # a hard link: its first name is traced


def test_trace_has_files_found_through_listings_and_lookups(
    tmp_path: Path, nydus_mount: MountFactory
) -> None:
    src = tmp_path / "src"
    _tree(src)
    image = tmp_path / "image"
    build([str(src)], image, BuildOptions())
    trace = tmp_path / "trace"
    cfg = tmp_path / "mount.yaml"
    cfg.write_text(f"backend: localfs\naccess_trace: {trace}\n")
    m = nydus_mount(image, cfg)
    mnt = m.mnt

    # A reader that stats what it lists: from now on listings carry attributes.
    for entry in os.scandir(mnt / "stat-me"):
        entry.stat(follow_symlinks=False)
    # Listed first (with attributes: the kernel has the entries), then opened: no LOOKUP.
    listed = sorted(os.listdir(mnt / "lib" / "python"))
    assert listed == [f"m{i}.py" for i in range(8)]
    opened = ["lib/python/m3.py", "lib/python/m0.py", "deep/a/b/c/leaf", "top",
              "lib/top-again", "lib/python/m3.py"]
    for rel in opened:
        assert (mnt / rel).read_bytes() == (src / rel).read_bytes()
    # The start's timeline beside the trace: when the command began, the mount came up, and
    # the first and the latest read arrived, in that order, wall-clock.
    proc = subprocess.run([sys.executable, "-m", "nydusfs.cli", "stat", str(mnt), "--json"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    tl = json.loads(proc.stdout)["timeline"]
    marks = [tl[k] for k in ("process_start", "mount_start", "ready", "first_read",
                             "last_read")]
    assert marks == sorted(marks) and time.time() - 600 < marks[0], tl
    m.close()

    got = trace.read_bytes().splitlines()
    # Each file once, at its first read, in order; `top` and `lib/top-again` are one file,
    # traced once under the name the image gives it first.
    assert got[:3] == [b"/lib/python/m3.py", b"/lib/python/m0.py", b"/deep/a/b/c/leaf"]
    assert got[3:] in ([b"/top"], [b"/lib/top-again"])
    # It is a prefetch list that resolves in the image.
    with Bootstrap.open(image / "bootstrap") as boot:
        inos = [boot.resolve(p).ino for p in read_prefetch_file(trace)]
    assert len(set(inos)) == 4


def test_trace_of_python_start_lists_its_modules(
    python_rootfs: Path, python_image: Path, tmp_path: Path, nydus_mount: MountFactory
) -> None:
    """python3 lists its stdlib directory (the path finder) before opening modules in it."""
    trace = tmp_path / "trace"
    cfg = tmp_path / "mount.yaml"
    cfg.write_text(f"backend: localfs\naccess_trace: {trace}\n")
    m = nydus_mount(python_image, cfg)
    proc = subprocess.run(["chroot", str(m.mnt), "/usr/bin/python3", "-c",
                           "import json, email, http.client; print('ok')"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    m.close()
    got = {p.decode() for p in trace.read_bytes().splitlines()}
    stdlib = [p for p in got if p.startswith("/usr/lib/python3.") and p.count("/") == 4]
    assert stdlib, sorted(got)
    version = stdlib[0].split("/")[3]  # python3.11, whatever the image has
    for module in ("json/__init__.py", "email/parser.py", "http/client.py", "ssl.py"):
        assert f"/usr/lib/{version}/{module}" in got, "\n".join(sorted(got))
    assert "/usr/bin/python3" in got or any(p.startswith("/usr/bin/python3.") for p in got)
