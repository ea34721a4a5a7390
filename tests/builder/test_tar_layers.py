"""Tar layer sources: OCI whiteouts, opaque directories, links and attributes → the final tree.

Data that a later layer deletes or overwrites carries a ``MARKER-`` string; none may survive in
the blob (every chunk of the blob is decoded and searched, and the chunks are checked to tile
the blob, so no stored byte escapes the search).
"""

from __future__ import annotations

import itertools
import os
import random
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest

from nydusfs.builder import BuildResult
from nydusfs.errors import SourceError
from nydusfs.format.reader import Bootstrap
from nydusfs.verify import check_image

from .helpers import (
    CAP_NET_RAW,
    COMPRESSIONS,
    Member,
    MiB,
    blob_plaintext,
    build_image,
    device,
    dir_,
    fifo,
    hardlink,
    image_snapshot,
    opaque,
    read_file,
    reg,
    sym,
    tar_bytes,
    whiteout,
    write_layer,
)

T0 = 1_600_000_000
BIG_DELETED = b"MARKER-BIG-DELETED" + random.Random(1).randbytes(2 * MiB + MiB // 2)
OVERWRITTEN = b"MARKER-OVERWRITTEN" + random.Random(2).randbytes(MiB)
MARKERS = [b"MARKER-DELETED-FILE", b"MARKER-DELETED-DIR-A", b"MARKER-DELETED-DIR-B",
           b"MARKER-OPAQUE-LOWER1", b"MARKER-OPAQUE-LOWER2", b"MARKER-BIG-DELETED",
           b"MARKER-OLD-CHANGED", b"MARKER-S2-LOWER", b"MARKER-S3-LOWER", b"MARKER-OVERWRITTEN"]


def layer1() -> list[Member]:
    return [
        dir_("./", mode=0o755, mtime=T0),
        dir_("etc", mode=0o755, mtime=T0),
        reg("etc/keep.conf", b"keep me\n", mtime_pax="1700000000.123456789"),
        reg("etc/changed.conf", b"old MARKER-OLD-CHANGED\n"),
        reg("etc/deleted.conf", b"MARKER-DELETED-FILE\n"),
        reg("etc/s2", b"MARKER-S2-LOWER\n"),
        reg("etc/s3", b"MARKER-S3-LOWER\n"),
        dir_("var"), dir_("var/lib"), dir_("var/lib/gone"),
        reg("var/lib/gone/a", b"MARKER-DELETED-DIR-A\n"),
        dir_("var/lib/gone/sub"),
        reg("var/lib/gone/sub/b", b"MARKER-DELETED-DIR-B\n"),
        dir_("opq", mode=0o750, uid=5, gid=6),
        reg("opq/lower1", b"MARKER-OPAQUE-LOWER1\n"),
        dir_("opq/subdir"),
        reg("opq/subdir/lower2", b"MARKER-OPAQUE-LOWER2\n"),
        dir_("usr"), dir_("usr/lib"),
        sym("lib", "usr/lib"),
        sym("lib64", "/usr/lib"),
        dir_("bin"),
        reg("bin/orig", b"original binary, version 1\n", mode=0o755),
        hardlink("bin/hl1", "bin/orig"),
        reg("bin/ping", b"\x7fELF ping\n", mode=0o4755,
            xattrs={"security.capability": CAP_NET_RAW, "user.note": b"pinged"}),
        dir_("dev"),
        device("dev/null", "c", 1, 3, mode=0o666),
        device("dev/sda", "b", 8, 0, gid=6),
        dir_("run"),
        fifo("run/initctl"),
        dir_("tmp", mode=0o1777),
        dir_("data"),
        reg("data/big.bin", BIG_DELETED),
        reg(b"names/\xff\xfe-l1", b"not utf-8\n"),
    ]


def layer2() -> list[Member]:
    return [
        reg("etc/changed.conf", b"new content, version 2\n", mode=0o600, uid=1000, gid=1000),
        whiteout("etc/deleted.conf"),
        whiteout("var/lib/gone"),
        opaque("opq"),
        reg("opq/new", b"upper\n"),
        reg("lib/foo", b"through the lib symlink\n"),
        reg("lib64/bar", b"through the absolute lib64 symlink\n"),
        whiteout("data/big.bin"),
        hardlink("bin/hl2", "bin/orig"),
        reg("data/replaced.bin", OVERWRITTEN),
    ]


def layer3() -> list[Member]:
    return [
        reg("bin/orig", b"replaced binary, version 3\n", mode=0o755),
        whiteout("etc/s2"), reg("etc/s2", b"s2 from layer 3\n"),  # whiteout first
        reg("etc/s3", b"s3 from layer 3\n"), whiteout("etc/s3"),  # same-layer entry first
        reg("etc/s4", b"s4 only in layer 3\n"), whiteout("etc/s4"),
        reg("data/replaced.bin", b"small now\n"),
        reg(b"names/\xc3\x28-l3", b"invalid utf-8 too\n"),
        dir_("etc", mode=0o700, uid=3, mtime=T0 + 3),  # re-declared: keeps its children
    ]


# path -> expected attributes ("data" is the content of a regular file)
EXPECTED: dict[bytes, dict[str, Any]] = {
    b"/": {"type": "dir", "mode": stat.S_IFDIR | 0o755, "mtime_ns": T0 * 10**9},
    b"/bin": {"type": "dir"},
    b"/bin/orig": {"type": "reg", "data": b"replaced binary, version 3\n", "nlink": 1},
    b"/bin/hl1": {"type": "reg", "data": b"original binary, version 1\n", "nlink": 2,
                  "link_group": b"/bin/hl1", "mode": stat.S_IFREG | 0o755},
    b"/bin/hl2": {"type": "reg", "data": b"original binary, version 1\n", "nlink": 2,
                  "link_group": b"/bin/hl1"},
    b"/bin/ping": {"type": "reg", "mode": stat.S_IFREG | 0o4755,
                   "xattrs": ((b"security.capability", CAP_NET_RAW), (b"user.note", b"pinged"))},
    b"/data": {"type": "dir"},
    b"/data/replaced.bin": {"type": "reg", "data": b"small now\n"},
    b"/dev": {"type": "dir"},
    b"/dev/null": {"type": "chr", "mode": stat.S_IFCHR | 0o666, "rdev": os.makedev(1, 3)},
    b"/dev/sda": {"type": "blk", "mode": stat.S_IFBLK | 0o660, "rdev": os.makedev(8, 0), "gid": 6},
    b"/etc": {"type": "dir", "mode": stat.S_IFDIR | 0o700, "uid": 3, "mtime_ns": (T0 + 3) * 10**9},
    b"/etc/keep.conf": {"type": "reg", "data": b"keep me\n", "mtime_ns": 1700000000123456789},
    b"/etc/changed.conf": {"type": "reg", "data": b"new content, version 2\n",
                           "mode": stat.S_IFREG | 0o600, "uid": 1000, "gid": 1000},
    b"/etc/s2": {"type": "reg", "data": b"s2 from layer 3\n"},
    b"/etc/s3": {"type": "reg", "data": b"s3 from layer 3\n"},
    b"/etc/s4": {"type": "reg", "data": b"s4 only in layer 3\n"},
    b"/lib": {"type": "lnk", "target": b"usr/lib", "mode": stat.S_IFLNK | 0o777},
    b"/lib64": {"type": "lnk", "target": b"/usr/lib"},
    b"/names": {"type": "dir", "mode": stat.S_IFDIR | 0o755, "uid": 0},
    b"/names/\xff\xfe-l1": {"type": "reg", "data": b"not utf-8\n"},
    b"/names/\xc3\x28-l3": {"type": "reg", "data": b"invalid utf-8 too\n"},
    b"/opq": {"type": "dir", "mode": stat.S_IFDIR | 0o750, "uid": 5, "gid": 6},
    b"/opq/new": {"type": "reg", "data": b"upper\n"},
    b"/run": {"type": "dir"},
    b"/run/initctl": {"type": "fifo", "mode": stat.S_IFIFO | 0o600},
    b"/tmp": {"type": "dir", "mode": stat.S_IFDIR | 0o1777},
    b"/usr": {"type": "dir"},
    b"/usr/lib": {"type": "dir"},
    b"/usr/lib/foo": {"type": "reg", "data": b"through the lib symlink\n"},
    b"/usr/lib/bar": {"type": "reg", "data": b"through the absolute lib64 symlink\n"},
    b"/var": {"type": "dir"},
    b"/var/lib": {"type": "dir", "nlink": 2},
}


def assert_tree(boot: Bootstrap, blobs: Path, expected: dict[bytes, dict[str, Any]]) -> None:
    """The image holds exactly ``expected``'s paths, each with the attributes listed there."""
    snap = image_snapshot(boot, None)
    assert sorted(snap) == sorted(expected)
    for path, want in expected.items():
        got = dict(snap[path])
        if "data" in want:
            got["data"] = read_file(boot, blobs, path)
        diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
        assert not diff, (path, diff)


def build_layers(tmp_path: Path, layers: list[list[Member]], kinds: list[str]) -> BuildResult:
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = [write_layer(tmp_path / f"layer{i}.{kind}", members, kind)
             for i, (members, kind) in enumerate(zip(layers, kinds, strict=True))]
    return build_image(paths, tmp_path / "out")


def assert_markers_absent(boot: Bootstrap, blobs: Path) -> None:
    for i in range(boot.blob_count):
        plain = blob_plaintext(boot, blobs, i)
        for marker in MARKERS:
            assert marker not in plain, marker
        raw = (blobs / boot.blob(i).hex).read_bytes()
        for marker in MARKERS:
            assert marker not in raw, marker


@pytest.mark.parametrize("kinds", [[k] * 3 for k in COMPRESSIONS] + [["gz", "zst", "xz"]],
                         ids=lambda ks: "-".join(ks))
def test_three_layers_give_the_final_tree(tmp_path: Path, kinds: list[str]) -> None:
    res = build_layers(tmp_path, [layer1(), layer2(), layer3()], kinds)
    out = tmp_path / "out"
    with Bootstrap.open(out / "bootstrap") as boot:
        check_image(boot, out / "blobs")
        assert_tree(boot, out / "blobs", EXPECTED)
        assert_markers_absent(boot, out / "blobs")
        assert boot.blob_count == 1
    # The deleted data was read (it went through the pipeline) but is not stored.
    assert res.bytes_in >= len(BIG_DELETED) + len(OVERWRITTEN)
    assert res.bytes_out < 64 * 1024
    assert res.warnings == []


def test_marker_search_finds_data_that_was_not_deleted(tmp_path: Path) -> None:
    """Control for the absence checks: with layer 1 alone every marker is found in the blob."""
    build_layers(tmp_path, [layer1()], ["zst"])
    with Bootstrap.open(tmp_path / "out/bootstrap") as boot:
        plain = blob_plaintext(boot, tmp_path / "out/blobs")
        for marker in MARKERS[:7]:  # the ones layer 1 holds
            assert marker in plain, marker
        assert boot.blob(0).size > len(BIG_DELETED)


def test_layers_are_reproducible(tmp_path: Path) -> None:
    a = build_layers(tmp_path / "a", [layer1(), layer2(), layer3()], ["gz"] * 3)
    b = build_layers(tmp_path / "b", [layer1(), layer2(), layer3()], ["tar", "zst", "xz"])
    assert a.root_digest == b.root_digest
    boot_a, boot_b = (tmp_path / "a/out/bootstrap"), (tmp_path / "b/out/bootstrap")
    assert boot_a.read_bytes() == boot_b.read_bytes()


def test_flattened_layers_equal_one_layer_of_the_final_tree(tmp_path: Path) -> None:
    """Three layers and a single tar of the expected result give the same root digest."""
    single = [
        dir_("./", mode=0o755, mtime=T0),
        dir_("bin"),
        reg("bin/hl1", b"original binary, version 1\n", mode=0o755),
        hardlink("bin/hl2", "bin/hl1"),
        reg("bin/orig", b"replaced binary, version 3\n", mode=0o755),
        reg("bin/ping", b"\x7fELF ping\n", mode=0o4755,
            xattrs={"security.capability": CAP_NET_RAW, "user.note": b"pinged"}),
        dir_("data"), reg("data/replaced.bin", b"small now\n"),
        dir_("dev"), device("dev/null", "c", 1, 3, mode=0o666), device("dev/sda", "b", 8, 0, gid=6),
        dir_("etc", mode=0o700, uid=3, mtime=T0 + 3),
        reg("etc/changed.conf", b"new content, version 2\n", mode=0o600, uid=1000, gid=1000),
        reg("etc/keep.conf", b"keep me\n", mtime_pax="1700000000.123456789"),
        reg("etc/s2", b"s2 from layer 3\n"), reg("etc/s3", b"s3 from layer 3\n"),
        reg("etc/s4", b"s4 only in layer 3\n"),
        sym("lib", "usr/lib"), sym("lib64", "/usr/lib"),
        reg(b"names/\xc3\x28-l3", b"invalid utf-8 too\n"),
        reg(b"names/\xff\xfe-l1", b"not utf-8\n"),
        dir_("opq", mode=0o750, uid=5, gid=6), reg("opq/new", b"upper\n"),
        dir_("run"), fifo("run/initctl"), dir_("tmp", mode=0o1777),
        dir_("usr"), dir_("usr/lib"),
        reg("usr/lib/bar", b"through the absolute lib64 symlink\n"),
        reg("usr/lib/foo", b"through the lib symlink\n"),
        dir_("var"), dir_("var/lib"),
    ]
    layered = build_layers(tmp_path / "l", [layer1(), layer2(), layer3()], ["tar"] * 3)
    flat = build_layers(tmp_path / "f", [single], ["tar"])
    with Bootstrap.open(tmp_path / "l/out/bootstrap") as bl, \
            Bootstrap.open(tmp_path / "f/out/bootstrap") as bf:
        snap_l, snap_f = image_snapshot(bl, None), image_snapshot(bf, None)
        diff = {p: (snap_l.get(p), snap_f.get(p)) for p in set(snap_l) | set(snap_f)
                if snap_l.get(p) != snap_f.get(p)}
        assert not diff
    assert layered.root_digest == flat.root_digest


def test_pax_mtime_nanoseconds_and_gnu_format_names(tmp_path: Path) -> None:
    members = [
        reg("ns", b"1", mtime_pax="1234567890.000000001"),
        reg("neg", b"2", mtime_pax="-1.5"),
        reg("whole", b"3", mtime=1_000_000_000),
        reg(b"\xe9t\xe9", b"latin-1 name"),
        reg("long/" + "x" * 200 + "/" + "y" * 200, b"long path"),
    ]
    for fmt, name in ((tarfile.PAX_FORMAT, "pax"), (tarfile.GNU_FORMAT, "gnu")):
        layer = tmp_path / f"{name}.tar"
        layer.write_bytes(tar_bytes(members, fmt=fmt))
        build_image([layer], tmp_path / name)
        with Bootstrap.open(tmp_path / name / "bootstrap") as boot:
            if fmt == tarfile.PAX_FORMAT:
                assert boot.resolve("ns").mtime_ns == 1_234_567_890_000_000_001
                assert boot.resolve("neg").mtime_ns == -1_500_000_000
            assert boot.resolve("whole").mtime_ns == 10**18
            assert read_file(boot, tmp_path / name / "blobs", b"\xe9t\xe9") == b"latin-1 name"
            long = boot.resolve("long/" + "x" * 200 + "/" + "y" * 200)
            assert read_file(boot, tmp_path / name / "blobs", long) == b"long path"


def test_hardlinks_across_layers_and_whiteouts_of_one_name(tmp_path: Path) -> None:
    l1 = [reg("a", b"shared data\n", mode=0o640, uid=7), hardlink("b", "a"),
          hardlink("./dir/c", "./a")]
    l2 = [whiteout("a"), hardlink("d", "b")]
    build_layers(tmp_path, [l1, l2], ["tar", "gz"])
    with Bootstrap.open(tmp_path / "out/bootstrap") as boot:
        names = ["b", "dir/c", "d"]
        nodes = [boot.resolve(n) for n in names]
        assert len({n.ino for n in nodes}) == 1 and nodes[0].nlink == 3
        assert nodes[0].uid == 7 and stat.S_IMODE(nodes[0].mode) == 0o640
        with pytest.raises(FileNotFoundError):
            boot.resolve("a")
        assert read_file(boot, tmp_path / "out/blobs", "d") == b"shared data\n"
        check_image(boot, tmp_path / "out/blobs")


def test_types_replace_each_other_and_dirs_merge(tmp_path: Path) -> None:
    l1 = [reg("x", b"file then dir"), dir_("y"), reg("y/child", b"gone with y"),
          dir_("z", mode=0o700), reg("z/kept", b"kept"), sym("s", "x"),
          reg("./dup", b"first MARKER-OVERWRITTEN"), reg("dup", b"second")]
    l2 = [dir_("x"), reg("x/inside", b"now a dir"), reg("y", b"dir then file"),
          dir_("z", mode=0o755, uid=9), reg("z/added", b"added"), reg("s", b"symlink replaced")]
    build_layers(tmp_path, [l1, l2], ["tar", "tar"])
    with Bootstrap.open(tmp_path / "out/bootstrap") as boot:
        blobs = tmp_path / "out/blobs"
        assert boot.resolve("x").is_dir()
        assert read_file(boot, blobs, "x/inside") == b"now a dir"
        assert read_file(boot, blobs, "y") == b"dir then file"
        z = boot.resolve("z")
        assert z.mode == stat.S_IFDIR | 0o755 and z.uid == 9
        assert sorted(e.name for e in boot.readdir(z)) == [b"added", b"kept"]
        assert read_file(boot, blobs, "s") == b"symlink replaced"
        assert read_file(boot, blobs, "dup") == b"second"
        assert sorted(p for p, _ in boot.walk()) == [
            b"/", b"/dup", b"/s", b"/x", b"/x/inside", b"/y", b"/z", b"/z/added", b"/z/kept"]
        assert b"MARKER-OVERWRITTEN" not in blob_plaintext(boot, blobs)
        check_image(boot, blobs)


def test_opaque_marker_after_same_layer_entries_keeps_them(tmp_path: Path) -> None:
    l1 = [dir_("d"), reg("d/old", b"MARKER-OPAQUE-LOWER1"), dir_("d/sub"),
          reg("d/sub/old2", b"MARKER-OPAQUE-LOWER2")]
    l2 = [reg("d/sub/new", b"same layer, before the marker"), opaque("d")]
    build_layers(tmp_path, [l1, l2], ["tar", "tar"])
    with Bootstrap.open(tmp_path / "out/bootstrap") as boot:
        assert sorted(p for p, _ in boot.walk()) == [b"/", b"/d", b"/d/sub", b"/d/sub/new"]
        assert_markers_absent(boot, tmp_path / "out/blobs")


def test_directory_whiteout_then_recreated_in_same_layer(tmp_path: Path) -> None:
    l1 = [dir_("var"), dir_("var/cache"), reg("var/cache/old", b"MARKER-DELETED-DIR-A")]
    l2 = [whiteout("var/cache"), dir_("var/cache", mode=0o700), reg("var/cache/new", b"new")]
    build_layers(tmp_path, [l1, l2], ["tar", "tar"])
    with Bootstrap.open(tmp_path / "out/bootstrap") as boot:
        assert sorted(p for p, _ in boot.walk()) == [b"/", b"/var", b"/var/cache",
                                                      b"/var/cache/new"]
        assert boot.resolve("var/cache").mode == stat.S_IFDIR | 0o700
        assert_markers_absent(boot, tmp_path / "out/blobs")


CACHE_L1 = [dir_("var"), dir_("var/cache", mode=0o750, uid=5),
            reg("var/cache/old", b"MARKER-DELETED-DIR-A"), dir_("var/cache/sub"),
            reg("var/cache/sub/old2", b"MARKER-DELETED-DIR-B")]


@pytest.mark.parametrize("order", ["children_first", "whiteout_first"])
def test_directory_whiteout_and_same_layer_children(tmp_path: Path, order: str) -> None:
    """Layer 2 fills var/cache and whites it out, in either order: its own entries stay
    (OCI: whiteouts apply to lower layers only), everything layer 1 had there is gone."""
    new = [reg("var/cache/new", b"same layer"), reg("var/cache/sub/new2", b"same layer 2")]
    l2 = [*new, whiteout("var/cache")] if order == "children_first" else [whiteout("var/cache"),
                                                                           *new]
    build_layers(tmp_path, [CACHE_L1, l2], ["tar", "tar"])
    with Bootstrap.open(tmp_path / "out/bootstrap") as boot:
        blobs = tmp_path / "out/blobs"
        # Layer 2 has no entry for var/cache or var/cache/sub: in either order they end up as
        # directories layer 2 created implicitly (0755, root, mtime 0), not layer 1's.
        implicit = {"type": "dir", "mode": stat.S_IFDIR | 0o755, "uid": 0, "mtime_ns": 0}
        assert_tree(boot, blobs, {
            b"/": {"type": "dir"},
            b"/var": {"type": "dir", "mode": stat.S_IFDIR | 0o755},
            b"/var/cache": implicit,
            b"/var/cache/new": {"type": "reg", "data": b"same layer"},
            b"/var/cache/sub": implicit,
            b"/var/cache/sub/new2": {"type": "reg", "data": b"same layer 2"},
        })
        assert_markers_absent(boot, blobs)
        check_image(boot, blobs)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))),
                         ids=lambda o: "".join("dnw"[i] for i in o))
def test_directory_whiteout_and_same_layer_dir_entry(tmp_path: Path, order: tuple[int, ...]
                                                     ) -> None:
    """Layer 2 declares var/cache, fills it and whites it out, in any order: the directory has
    layer 2's attributes and contents only (lower contents hidden, as by an opaque marker)."""
    entries = [dir_("var/cache", mode=0o700, uid=9), reg("var/cache/new", b"same layer"),
               whiteout("var/cache")]
    build_layers(tmp_path, [CACHE_L1, [entries[i] for i in order]], ["tar", "gz"])
    with Bootstrap.open(tmp_path / "out/bootstrap") as boot:
        blobs = tmp_path / "out/blobs"
        assert_tree(boot, blobs, {
            b"/": {"type": "dir"},
            b"/var": {"type": "dir"},
            b"/var/cache": {"type": "dir", "mode": stat.S_IFDIR | 0o700, "uid": 9, "nlink": 2},
            b"/var/cache/new": {"type": "reg", "data": b"same layer", "nlink": 1},
        })
        assert_markers_absent(boot, blobs)
        check_image(boot, blobs)
    canonical = build_layers(tmp_path / "canonical", [CACHE_L1, entries], ["tar", "gz"])
    assert (tmp_path / "out/bootstrap").read_bytes() == canonical.bootstrap.read_bytes()


@pytest.mark.parametrize("order", ["entry_first", "whiteout_first"])
def test_file_whiteout_and_same_layer_entry_of_another_type(tmp_path: Path, order: str) -> None:
    """A lower file whited out and made a directory by the same layer, in either order."""
    l1 = [reg("f", b"MARKER-DELETED-FILE"), reg("g", b"MARKER-OVERWRITTEN")]
    mine = [dir_("f", mode=0o711), reg("f/x", b"x"), sym("g", "f/x")]
    outs = [whiteout("f"), whiteout("g")]
    build_layers(tmp_path, [l1, mine + outs if order == "entry_first" else outs + mine],
                 ["tar", "tar"])
    with Bootstrap.open(tmp_path / "out/bootstrap") as boot:
        blobs = tmp_path / "out/blobs"
        assert_tree(boot, blobs, {
            b"/": {"type": "dir"},
            b"/f": {"type": "dir", "mode": stat.S_IFDIR | 0o711},
            b"/f/x": {"type": "reg", "data": b"x"},
            b"/g": {"type": "lnk", "target": b"f/x"},
        })
        assert_markers_absent(boot, blobs)


def test_aufs_metadata_subtree_is_skipped(tmp_path: Path) -> None:
    """aufs bookkeeping (.wh..wh.plnk/, .wh..wh.orph/, .wh..wh.aufs) at any depth is not image
    content: neither the entries nor anything below them (containerd skips the subtree)."""
    layer = [dir_(".wh..wh.plnk"), reg(".wh..wh.plnk/1.2", b"MARKER-DELETED-FILE"),
             dir_(".wh..wh.plnk/deeper"), reg(".wh..wh.plnk/deeper/3.4", b"MARKER-DELETED-DIR-A"),
             reg(".wh..wh.aufs"), dir_("d"), dir_("d/.wh..wh.orph"),
             reg("d/.wh..wh.orph/5.6", b"MARKER-DELETED-DIR-B"), sym(".wh..wh.orph/s", "real"),
             reg("real", b"r"), reg("d/kept", b"k")]
    build_layers(tmp_path, [layer], ["tar"])
    with Bootstrap.open(tmp_path / "out/bootstrap") as boot:
        blobs = tmp_path / "out/blobs"
        assert_tree(boot, blobs, {
            b"/": {"type": "dir"},
            b"/d": {"type": "dir"},
            b"/d/kept": {"type": "reg", "data": b"k"},
            b"/real": {"type": "reg", "data": b"r"},
        })
        assert_markers_absent(boot, blobs)


def test_parent_symlink_loop_is_a_source_error(tmp_path: Path) -> None:
    l1 = [sym("a", "b"), sym("b", "a")]
    l2 = [reg("a/x", b"never")]
    with pytest.raises(SourceError, match="symbolic links"):
        build_layers(tmp_path, [l1, l2], ["tar", "tar"])
    assert not (tmp_path / "out/bootstrap").exists()
