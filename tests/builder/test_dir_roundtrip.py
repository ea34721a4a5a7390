"""Directory source: every inode type and attribute survives build → Bootstrap, byte for byte.

The source is ``treegen``'s full tree (devices, FIFO, socket, hardlinks, setuid/setgid/sticky,
xattrs incl. ``security.capability``, non-UTF-8 names, a chain deeper than PATH_MAX). What the
image says is compared with what ``lstat``/``readlink``/``getxattr``/``read`` say on disk; file
bytes come from the blob (pread each chunk's extent, decode, digest-check).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from treegen import CAP_NET_BIND_SERVICE_V2, FullTreeInfo, read_file_at, snapshot_tree

from nydusfs.builder import BuildResult
from nydusfs.errors import BuildError
from nydusfs.format import layout as L
from nydusfs.format.reader import Bootstrap
from nydusfs.verify import check_image

from .helpers import (
    MiB,
    Snapshot,
    assert_snapshots_equal,
    build_image,
    clone_tree,
    image_snapshot,
    read_file,
    run_cli,
)


@dataclass
class Built:
    src: Path
    out: Path
    result: BuildResult
    boot: Bootstrap
    info: FullTreeInfo

    @property
    def blobs(self) -> Path:
        return self.out / "blobs"


@pytest.fixture(scope="module")
def built(full_tree_info: FullTreeInfo, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Built]:
    out = tmp_path_factory.mktemp("dir_rt") / "out"
    result = build_image([full_tree_info.root], out)
    with Bootstrap.open(out / "bootstrap") as boot:
        yield Built(full_tree_info.root, out, result, boot, full_tree_info)


@pytest.fixture(scope="module")
def source_snapshot(full_tree_info: FullTreeInfo) -> Snapshot:
    return snapshot_tree(full_tree_info.root)


def image_files(out: Path) -> dict[str, bytes]:
    """Every file of an output directory (bootstrap and blobs) by relative path."""
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted(out.rglob("*")) if p.is_file()}


# ---- round trip -----------------------------------------------------------------------------


def test_every_path_and_attribute_round_trips(built: Built, source_snapshot: Snapshot) -> None:
    assert_snapshots_equal(image_snapshot(built.boot, built.blobs), source_snapshot)


def test_image_passes_check_with_blobs(built: Built) -> None:
    report = check_image(built.boot, built.blobs)
    assert report["root_digest"] == built.result.root_digest
    assert report["chunks_verified"] == built.boot.chunk_count == built.result.chunks
    assert report["inodes"] == built.result.inodes


def test_lstat_fields_match_inode_for_inode(built: Built) -> None:
    """The same comparison spelled out with os.lstat on (short) source paths."""
    src = os.fsencode(built.src)
    checked = 0
    for path, node in built.boot.walk():
        host = src + (path if path != b"/" else b"")
        if len(host) >= 4000:  # the deep chain: covered by the snapshot comparison
            continue
        st = os.lstat(host)
        assert node.mode == st.st_mode, path
        assert (node.uid, node.gid) == (st.st_uid, st.st_gid), path
        assert node.mtime_ns == st.st_mtime_ns, path
        assert node.nlink == st.st_nlink, path
        if not node.is_dir():
            assert node.size == st.st_size, path
        if stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode):
            assert node.rdev == st.st_rdev, path
        if node.is_symlink():
            assert built.boot.readlink(node) == os.readlink(host), path
        want = {os.fsencode(n): os.getxattr(host, n, follow_symlinks=False)
                for n in os.listxattr(host, follow_symlinks=False)}
        assert {x.name: x.value for x in built.boot.xattrs(node)} == want, path
        if node.is_reg():
            with open(host, "rb") as f:
                assert read_file(built.boot, built.blobs, node) == f.read(), path
        checked += 1
    assert checked > 50


def test_special_modes_devices_fifo_socket(built: Built) -> None:
    p = built.info.paths
    b = built.boot
    assert stat.S_IMODE(b.resolve(p["setuid"]).mode) == 0o4755
    assert stat.S_IMODE(b.resolve(p["setgid_file"]).mode) == 0o2711
    assert b.resolve(p["setgid_file"]).gid == 50
    assert stat.S_IMODE(b.resolve(p["all_bits"]).mode) == 0o7777
    assert stat.S_IMODE(b.resolve(p["no_perms"]).mode) == 0
    assert b.resolve(p["setgid_dir"]).mode == stat.S_IFDIR | 0o2755
    assert b.resolve(p["sticky_dir"]).mode == stat.S_IFDIR | 0o1777
    null, sda, bigdev = (b.resolve(d) for d in built.info.devices)
    assert null.mode == stat.S_IFCHR | 0o666 and null.rdev == os.makedev(1, 3)
    assert sda.mode == stat.S_IFBLK | 0o660 and sda.rdev == os.makedev(8, 0)
    assert sda.gid == 6
    assert os.major(bigdev.rdev) == 511 and os.minor(bigdev.rdev) == 300_000
    fifo = b.resolve(built.info.fifo)
    assert stat.S_ISFIFO(fifo.mode) and (fifo.uid, fifo.gid) == (1000, 1000)
    assert stat.S_ISSOCK(b.resolve(built.info.sock).mode)
    big_ids = b.resolve(p["owners/big_ids"])
    assert (big_ids.uid, big_ids.gid) == (123456, 654321)


def test_hardlinks_share_one_inode_with_nlink_names(built: Built) -> None:
    b = built.boot
    nodes = [b.resolve(p) for p in built.info.hardlinks]
    assert len({n.ino for n in nodes}) == 1
    assert nodes[0].nlink == len(built.info.hardlinks) == 3
    assert b.getxattr(nodes[0], b"user.shared_by_hardlinks") == b"3"
    syms = [b.resolve(p) for p in built.info.symlink_hardlinks]
    assert len({n.ino for n in syms}) == 1 and syms[0].nlink == 2
    assert b.readlink(syms[0]) == b"small.txt"
    # Counted once: inode count = distinct inodes on disk.
    seen = {(st.st_dev, st.st_ino) for st in _lstat_all(built.src)}
    assert b.inode_count == len(seen) == built.result.inodes
    assert built.result.hardlinked_files == 2


def _lstat_all(root: Path) -> Iterator[os.stat_result]:
    yield os.lstat(root)
    stack = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    while stack:
        fd = stack.pop()
        try:
            with os.scandir(fd) as it:
                names = [e.name for e in it]
            for name in names:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                yield st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd))
        finally:
            os.close(fd)


def test_odd_names_and_deep_paths(built: Built) -> None:
    b = built.boot
    for p in built.info.odd_names:
        node = b.resolve(p)
        assert read_file(b, built.blobs, node) == read_file_at(built.src, p)
    names = {e.name for e in b.readdir(b.resolve(b"/names"))}
    assert b"\xff\xfe" in names and b"new\nline" in names and b"\xe9" * 255 in names
    deep = b.resolve(built.info.deep_dir)
    assert deep.is_dir()
    assert len(built.info.deep_dir) > 4096 and built.info.deep_dir.count(b"/") >= 299
    bottom = built.info.deep_dir + b"/bottom.txt"
    assert read_file(b, built.blobs, bottom) == read_file_at(built.src, bottom)
    assert b.getxattr(b.resolve(bottom), b"user.depth") == b"300"
    assert b.readlink(b.resolve(built.info.deep_dir + b"/up")) == b"../../../../../x"


def test_xattrs_timestamps_symlinks(built: Built) -> None:
    b = built.boot
    p = built.info.paths
    cap = b.resolve(p["xattr_cap"])
    if "security" in built.info.xattr_kinds:
        assert b.getxattr(cap, b"security.capability") == CAP_NET_BIND_SERVICE_V2
    xf = b.resolve(p["xattr_file"])
    assert b.getxattr(xf, b"user.binary") == bytes(range(256))
    assert b.getxattr(xf, b"user.empty") == b""
    assert b.getxattr(b.resolve(b"/"), b"user.root") == b"r"
    assert b.resolve(p["pre_epoch"]).mtime_ns == -1_500_000_000
    assert b.resolve(p["y2100"]).mtime_ns == 4_102_444_800_987_654_321
    assert b.resolve(p["epoch"]).mtime_ns == 0
    assert b.readlink(b.resolve(p["sym_long"])) == b"/".join([b"c" * 99] * 40)
    assert b.readlink(b.resolve(p["sym_binary"])) == b"\xff\xfe/tar get\n"
    assert b.readlink(b.resolve(p["sym_outside"])) == b"../../etc/passwd"


def test_file_data_sparse_empty_and_big(built: Built) -> None:
    b = built.boot
    sparse = read_file(b, built.blobs, built.info.sparse_file)
    assert len(sparse) == 10 * MiB + 3
    assert sparse == read_file_at(built.src, built.info.sparse_file)
    assert sparse[: MiB + 100] == bytes(MiB + 100)
    empty = b.resolve(built.info.paths["empty"])
    assert empty.size == 0 and b.file_chunks(empty) == []
    for p in built.info.big_files:
        node = b.resolve(p)
        refs = b.file_chunks(node)
        assert [r.file_offset for r in refs] == list(range(0, node.size, MiB))
        assert read_file(b, built.blobs, node) == read_file_at(built.src, p)
    # The duplicated pair stores its chunks once.
    a, c = (b.resolve(p) for p in built.info.dedup_pair)
    assert a.ino != c.ino
    assert [r.chunk.index for r in b.file_chunks(a)] == [r.chunk.index for r in b.file_chunks(c)]


# ---- reproducibility ------------------------------------------------------------------------


def test_same_tree_twice_is_byte_identical(built: Built, tmp_path: Path) -> None:
    again = build_image([built.src], tmp_path / "again")
    assert image_files(tmp_path / "again") == image_files(built.out)
    assert again.root_digest == built.result.root_digest
    assert again.bootstrap_sha256 == built.result.bootstrap_sha256


def test_worker_count_does_not_change_output(built: Built, tmp_path: Path) -> None:
    build_image([built.src], tmp_path / "w1", workers=1)
    build_image([built.src], tmp_path / "w5", workers=5)
    assert image_files(tmp_path / "w1") == image_files(built.out)
    assert image_files(tmp_path / "w5") == image_files(built.out)


def test_copy_elsewhere_has_same_root_digest(built: Built, tmp_path: Path) -> None:
    """A copy in another place, made in reverse order (other inode numbers) → same image.

    (``cp -a`` cannot copy the deep chain: it fails past PATH_MAX; ``clone_tree`` is an
    fd-relative ``cp -a``. ``cp -a`` itself is used on a smaller tree below.)
    """
    copy = tmp_path / "some" / "other" / "place"
    copy.parent.mkdir(parents=True)
    clone_tree(built.src, copy)
    assert_snapshots_equal(snapshot_tree(copy), snapshot_tree(built.src))
    res = build_image([copy], tmp_path / "out")
    assert res.root_digest == built.result.root_digest
    assert image_files(tmp_path / "out") == image_files(built.out)


def test_creation_order_and_cp_a_copy_do_not_matter(tmp_path: Path) -> None:
    """Same content created in opposite orders, and a ``cp -a`` copy → one image."""
    files = {f"d{i}/f{j}": bytes([i, j]) * (1000 * j + 1) for i in range(4) for j in range(5)}
    stamp = 1_234_567_890_123_456_789
    for name, items in (("fwd", list(files.items())), ("rev", list(reversed(files.items())))):
        root = tmp_path / name
        for rel, data in items:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        os.symlink("d1/f2", root / "link")
        os.setxattr(root / "d3" / "f4", "user.k", b"v")
        for p in [*root.rglob("*"), root]:
            os.utime(p, ns=(stamp, stamp), follow_symlinks=False)
    if shutil.which("cp"):
        subprocess.run(["cp", "-a", "--", str(tmp_path / "fwd"), str(tmp_path / "cp")],
                       check=True)
    outs = {}
    for name in ("fwd", "rev", "cp"):
        if (tmp_path / name).exists():
            build_image([tmp_path / name], tmp_path / f"out-{name}")
            outs[name] = image_files(tmp_path / f"out-{name}")
    assert outs["rev"] == outs["fwd"]
    assert outs.get("cp", outs["fwd"]) == outs["fwd"]
    # ... while a single attribute difference changes the root digest.
    os.chmod(tmp_path / "rev" / "d2" / "f3", 0o600)
    os.utime(tmp_path / "rev" / "d2" / "f3", ns=(stamp, stamp))
    changed = build_image([tmp_path / "rev"], tmp_path / "out-changed")
    with Bootstrap.open(tmp_path / "out-fwd" / "bootstrap") as b:
        assert changed.root_digest != b.header.root_digest.hex()


@pytest.mark.parametrize("chunker", ["fixed", "cdc"])
def test_chunkers_reproducible_and_round_trip(
    built: Built, source_snapshot: Snapshot, tmp_path: Path, chunker: str
) -> None:
    opts = {"chunker": chunker, "chunk_size": 64 * 1024}
    r1 = build_image([built.src], tmp_path / "a", workers=1, **opts)
    r2 = build_image([built.src], tmp_path / "b", workers=3, **opts)
    assert image_files(tmp_path / "a") == image_files(tmp_path / "b")
    assert r1.root_digest == r2.root_digest
    with Bootstrap.open(tmp_path / "a" / "bootstrap") as boot:
        assert boot.header.cdc == (chunker == "cdc")
        assert boot.header.chunk_size == 64 * 1024
        check_image(boot, tmp_path / "a" / "blobs")
        assert_snapshots_equal(image_snapshot(boot, tmp_path / "a" / "blobs"), source_snapshot)
        sizes = {c.uncompressed_size for c in boot.chunks()}
        if chunker == "fixed":
            assert max(sizes) == 64 * 1024
        else:  # content-defined: sizes vary around the average, capped at 4x
            assert len(sizes) > 10 and max(sizes) <= 4 * 64 * 1024


def test_uncompressed_build_stores_raw_chunks(
    built: Built, source_snapshot: Snapshot, tmp_path: Path
) -> None:
    build_image([built.src], tmp_path / "raw", compression="none")
    with Bootstrap.open(tmp_path / "raw" / "bootstrap") as boot:
        assert boot.header.compression == L.COMPRESSION_NONE
        assert all(c.flags == 0 and c.compressed_size == c.uncompressed_size
                   for c in boot.chunks())
        check_image(boot, tmp_path / "raw" / "blobs")
        assert_snapshots_equal(image_snapshot(boot, tmp_path / "raw" / "blobs"),
                               source_snapshot)
        # Same tree, same attributes: the Merkle root does not depend on how data is stored.
        assert boot.header.root_digest.hex() == built.result.root_digest


@pytest.mark.parametrize("rel", ["out", "deep/er/out"])
def test_output_inside_the_source_is_left_out(tmp_path: Path, rel: str) -> None:
    """``nydusfs build SRC -o SRC/...``: OUT (bootstrap, blobs, the builder's temporary files)
    is not part of the image, the build says so, and the image is the same whichever process
    builds it and whatever OUT already holds."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "data").write_bytes(b"payload")
    (src / "sub" / "f").write_bytes(b"f")
    out = src / rel
    first = build_image([src], out)
    warned = [w for w in first.warnings if "inside the source" in w]
    assert len(warned) == 1 and rel in warned[0], first.warnings
    parents = [b"/" + rel.encode().rsplit(b"/", i)[0] for i in range(rel.count("/"), 0, -1)]
    with Bootstrap.open(out / "bootstrap") as boot:
        paths = sorted(p for p, _ in boot.walk())
        assert paths == sorted([b"/", b"/data", b"/sub", b"/sub/f", *parents])
        assert read_file(boot, out / "blobs", "data") == b"payload"
        check_image(boot, out / "blobs")
    want = image_files(out)
    # Again from another process (other PID, other temporary names), into the OUT that now
    # holds an image: the same bootstrap and blob, and a warning on stderr.
    res = run_cli("build", src, "-o", out)
    assert res.returncode == 0, res.stderr
    assert [ln for ln in res.stderr.splitlines() if "inside the source" in ln] == [
        f"nydusfs: warning: {warned[0]}"]
    assert image_files(out) == want
    # The image is the source without OUT: move OUT away (restoring its parent's mtime) and
    # build elsewhere.
    parent_st = out.parent.stat()
    out.rename(tmp_path / "moved")
    os.utime(out.parent, ns=(parent_st.st_atime_ns, parent_st.st_mtime_ns))
    elsewhere = build_image([src], tmp_path / "elsewhere")
    assert elsewhere.warnings == []
    assert elsewhere.root_digest == first.root_digest
    assert image_files(tmp_path / "elsewhere") == want


def test_output_equal_to_the_source_is_refused(tmp_path: Path) -> None:
    """OUT == SRC would put the builder's own files into the image: a clear error instead,
    and the source is left as it was."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(b"payload")
    with pytest.raises(BuildError, match="must not be the source"):
        build_image([src], src)
    assert sorted(p.name for p in src.iterdir()) == ["data"]
