"""What makes metadata walks cheap: a bootstrap resident in memory, no xattr round trips.

``ImageFS.load_bootstrap`` is exercised directly (sizes against the limit, a corrupted file);
real mounts then check that a walk after the bootstrap file was destroyed still sees the source
(it is served from the copy), and what readers see of extended attributes: an image without
any answers like a filesystem without xattr support (EOPNOTSUPP, from the kernel), an image
with some answers per file as always.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from treegen import snapshot_tree

from nydusfs.builder import BuildOptions, build
from nydusfs.config import parse_config
from nydusfs.errors import ConfigError
from nydusfs.format.reader import Bootstrap
from nydusfs.fs.model import ImageFS
from nydusfs.storage.memory import MemoryBackend

from .conftest import MountFactory

NYDUSFS = [sys.executable, "-m", "nydusfs.cli"]
needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs root and /dev/fuse")


def _plain_tree(root: Path) -> Path:
    """Every inode type, owners and special mode bits, and no extended attribute anywhere."""
    (root / "d" / "sub").mkdir(parents=True)
    for i in range(30):
        (root / "d" / f"f{i:02}").write_bytes(b"%d\n" % i * i)
    (root / "d" / "sub" / "empty").touch()
    os.link(root / "d" / "f03", root / "d" / "sub" / "hard")
    os.symlink("../f01", root / "d" / "sub" / "link")
    os.symlink("nowhere", root / "dangling")
    tool = root / "tool"
    tool.write_bytes(b"#!/bin/sh\n")
    tool.chmod(0o4755)
    os.chown(tool, 1000, 1000)
    sticky = root / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    os.mkfifo(root / "fifo")
    if os.geteuid() == 0:
        os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return root


def _ls_lr(root: Path) -> str:
    """`ls -lR` without the `total` lines (allocated blocks: an image stores sizes only)."""
    proc = subprocess.run(["ls", "-lRAn", "--time-style=full-iso", "."], cwd=root,
                          capture_output=True, timeout=60, check=True)
    lines = proc.stdout.decode("utf-8", "backslashreplace").splitlines()
    return "\n".join(ln for ln in lines if not ln.startswith("total "))


def _image(src: Path, out: Path) -> Path:
    build([str(src)], out, BuildOptions())
    return out


def _fs(image: Path, bootstrap_memory: int) -> ImageFS:
    blobs = {p.name: p.read_bytes() for p in (image / "blobs").iterdir()}
    return ImageFS(Bootstrap.open(image / "bootstrap"), MemoryBackend(blobs),
                   bootstrap_memory=bootstrap_memory)


def _walk(fs: ImageFS) -> list[tuple[bytes, object, list[bytes]]]:
    out: list[tuple[bytes, object, list[bytes]]] = []
    todo = [(b"", 1)]
    while todo:
        path, ino = todo.pop()
        attr = fs.getattr(ino)
        out.append((path, attr, fs.listxattr(ino)))
        if stat.S_ISDIR(attr.mode):
            listing = fs.listdir(ino)
            todo += [(path + b"/" + n, i) for n, i in zip(listing.names, listing.inos,
                                                         strict=True)]
    return out


# ---- the resident bootstrap, without FUSE --------------------------------------------------


def test_bootstrap_memory_config(tmp_path: Path) -> None:
    assert parse_config(None, base_dir=tmp_path).read.bootstrap_memory == 256 << 20
    cfg = parse_config({"read": {"bootstrap_memory": "1GiB"}}, base_dir=tmp_path)
    assert cfg.read.bootstrap_memory == 1 << 30
    assert parse_config({"read": {"bootstrap_memory": 0}},
                        base_dir=tmp_path).read.bootstrap_memory == 0
    with pytest.raises(ConfigError, match=r"read\.bootstrap_memory: must be >= 0"):
        parse_config({"read": {"bootstrap_memory": -1}}, base_dir=tmp_path)


def test_bootstrap_loads_into_memory_only_within_the_limit(tmp_path: Path) -> None:
    image = _image(_plain_tree(tmp_path / "src"), tmp_path / "image")
    size = (image / "bootstrap").stat().st_size
    for limit, loaded in ((0, False), (size - 1, False), (size, True)):
        fs = _fs(image, limit)
        try:
            want = _walk(fs)
            assert asyncio.run(fs.load_bootstrap()) is loaded
            assert fs.boot.resident is loaded
            assert fs.stats.bootstrap_resident_bytes == (size if loaded else 0)
            assert _walk(fs) == want
        finally:
            fs.boot.close()


def test_a_corrupted_bootstrap_stays_mapped_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = _image(_plain_tree(tmp_path / "src"), tmp_path / "image")
    path = image / "bootstrap"
    fs = _fs(image, 1 << 30)
    try:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF  # a byte the header does not cover; the checksum does
        with open(path, "r+b") as f:
            f.write(data)
        with caplog.at_level(logging.WARNING, logger="nydusfs.fs.model"):
            assert asyncio.run(fs.load_bootstrap()) is False
        assert not fs.boot.resident and fs.stats.bootstrap_resident_bytes == 0
        assert "bootstrap stays mapped" in caplog.text and "checksum mismatch" in caplog.text
        assert fs.getattr(1).ino == 1  # still serving, from the mapping
    finally:
        fs.boot.close()


# ---- real mounts -----------------------------------------------------------------------------


def _stat(mnt: Path) -> dict[str, Any]:
    proc = subprocess.run([*NYDUSFS, "stat", str(mnt), "--json"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@needs_fuse
def test_a_walk_after_the_bootstrap_file_is_destroyed_sees_the_source(
    tmp_path: Path, nydus_mount: MountFactory
) -> None:
    src = _plain_tree(tmp_path / "src")
    image = _image(src, tmp_path / "image")
    size = (image / "bootstrap").stat().st_size
    m = nydus_mount(image)  # default config: bootstrap_memory 256 MiB
    for _ in range(400):  # bounded poll (20 s) for the background load
        if _stat(m.mnt)["read"]["bootstrap_resident_bytes"] == size:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the bootstrap was not loaded into memory within 20 s")
    with open(image / "bootstrap", "r+b") as f:  # in place: the inode the daemon opened
        f.write(b"\0" * size)
        f.truncate(64)  # a mapping of it would now be SIGBUS past the first page
    want, got = snapshot_tree(src), snapshot_tree(m.mnt)  # the first walk: nothing cached
    assert got == want
    assert _ls_lr(m.mnt) == _ls_lr(src)


@needs_fuse
def test_an_image_without_xattrs_reports_no_xattr_support(
    tmp_path: Path, nydus_mount: MountFactory
) -> None:
    src = _plain_tree(tmp_path / "src")
    image = _image(src, tmp_path / "image")
    with Bootstrap.open(image / "bootstrap") as boot:
        assert boot.header.count("xattrs") == 0, "the source tree got xattrs from its filesystem"
    m = nydus_mount(image)
    for rel in ("d/f00", "d", "d/sub/link", "fifo", "."):
        p = m.mnt / rel
        for attempt in range(2):  # the first answer (ENOSYS) and the kernel's own afterwards
            with pytest.raises(OSError) as exc:
                os.listxattr(p, follow_symlinks=False)
            assert exc.value.errno == errno.EOPNOTSUPP, (rel, attempt)
            for name in ("user.x", "security.selinux", "security.capability",
                         "system.posix_acl_access"):
                with pytest.raises(OSError) as exc:
                    os.getxattr(p, name, follow_symlinks=False)
                # An ACL goes through the kernel's ACL code, which reports "no ACL" (ENODATA)
                # for a FUSE filesystem without xattrs (fs/fuse/acl.c, 6.x); older kernels
                # refuse ACL names on a filesystem without ACL support (EOPNOTSUPP).
                # The VFS answers user.* of a symlink or special file itself (ENODATA).
                allowed = {errno.EOPNOTSUPP}
                if name.startswith("system."):
                    allowed.add(errno.ENODATA)
                elif name.startswith("user.") and rel in ("d/sub/link", "fifo"):
                    allowed = {errno.ENODATA}
                assert exc.value.errno in allowed, (rel, name, attempt, exc.value)
    assert snapshot_tree(m.mnt) == snapshot_tree(src)
    want = _ls_lr(src)
    assert want.count("\n") > 30
    assert _ls_lr(m.mnt) == want


@needs_fuse
def test_an_image_with_xattrs_answers_per_file(tmp_path: Path,
                                               nydus_mount: MountFactory) -> None:
    src = _plain_tree(tmp_path / "src")
    os.setxattr(src / "d" / "f05", "user.k", b"v")
    m = nydus_mount(_image(src, tmp_path / "image"))
    assert os.listxattr(m.mnt / "d" / "f05") == ["user.k"]
    assert os.getxattr(m.mnt / "d" / "f05", "user.k") == b"v"
    for rel in ("d/f00", "d", "."):
        assert os.listxattr(m.mnt / rel) == []
        for name in ("user.k", "security.selinux", "system.posix_acl_access"):
            with pytest.raises(OSError) as exc:
                os.getxattr(m.mnt / rel, name)
            assert exc.value.errno == errno.ENODATA, (rel, name)
    assert snapshot_tree(m.mnt) == snapshot_tree(src)
    assert _ls_lr(m.mnt) == _ls_lr(src)
