"""OCI image layout sources (``oci:PATH[:TAG]``).

Two kinds of layouts: ones written by real tools (``umoci`` repack/insert, re-compressed and
re-typed by ``skopeo``), checked against ``umoci unpack``'s rootfs attribute by attribute and
byte by byte; and ones written here by hand (always available), for the error paths: corrupt
blobs, unknown tags, non-image manifests, platform indexes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from treegen import snapshot_tree

from nydusfs.errors import IntegrityError, NydusfsError, SourceError
from nydusfs.format.reader import Bootstrap
from nydusfs.verify import check_image

from .helpers import (
    CAP_NET_RAW,
    Member,
    MiB,
    assert_clean_error,
    assert_snapshots_equal,
    blob_plaintext,
    build_image,
    compress,
    dir_,
    hardlink,
    image_snapshot,
    read_file,
    reg,
    run_cli,
    sym,
    tar_bytes,
    whiteout,
)

UMOCI = shutil.which("umoci")
SKOPEO = shutil.which("skopeo")
needs_umoci = pytest.mark.skipif(
    UMOCI is None, reason="umoci not installed (Debian: apt-get install umoci)")
needs_skopeo = pytest.mark.skipif(
    SKOPEO is None, reason="skopeo not installed (Debian: apt-get install skopeo)")

STAMP = 1_650_000_000_000_000_000


def _sh(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True, timeout=120)


def _stamp_tree(root: Path, ns: int = STAMP) -> None:
    """Give every entry a fixed mtime (umoci records mtimes; the test compares them)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*filenames, *dirnames]:
            os.utime(os.path.join(dirpath, name), ns=(ns, ns), follow_symlinks=False)
    os.utime(root, ns=(ns, ns))


# ---- layouts written by umoci ---------------------------------------------------------------


@dataclass
class UmociLayout:
    path: Path
    tmp: Path

    def unpack(self, tag: str) -> Path:
        bundle = self.tmp / f"unpacked-{tag}"
        if not bundle.exists():
            _sh(UMOCI or "umoci", "unpack", "--image", f"{self.path}:{tag}", bundle)
        return bundle / "rootfs"


def _layer1(rootfs: Path) -> None:
    rng = random.Random(42)
    for d in ("etc", "gone/sub", "opt/old", "usr/bin", "usr/lib", "var/cache", "dev"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/keep").write_bytes(b"unchanged\n")
    (rootfs / "etc/changed").write_bytes(b"version 1 MARKER-V1-CHANGED\n")
    (rootfs / "etc/deleted").write_bytes(b"MARKER-DELETED\n")
    (rootfs / "gone/sub/file").write_bytes(b"MARKER-GONE-DIR\n")
    (rootfs / "opt/old/data").write_bytes(b"MARKER-OPAQUE-OLD\n")
    (rootfs / "usr/bin/tool").write_bytes(b"MARKER-BIG" + rng.randbytes(3 * MiB // 2))
    (rootfs / "usr/bin/keep").write_bytes(rng.randbytes(MiB + 5))
    os.link(rootfs / "usr/bin/keep", rootfs / "usr/bin/keep-link")
    (rootfs / "usr/bin/ping").write_bytes(b"\x7fELF ping\n")
    os.chmod(rootfs / "usr/bin/ping", 0o4755)
    os.setxattr(rootfs / "usr/bin/ping", "security.capability", CAP_NET_RAW)
    os.setxattr(rootfs / "etc/keep", "user.comment", b"kept")
    os.symlink("usr/lib", rootfs / "lib")
    (rootfs / "usr/lib/libc.so").write_bytes(b"libc\n")
    os.mknod(rootfs / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(rootfs / "var/cache/fifo", 0o600)
    (rootfs / os.fsdecode(b"etc/\xff\xfe-name")).write_bytes(b"odd name\n")
    (rootfs / "var/cache/owned").write_bytes(b"owned\n")
    os.chown(rootfs / "var/cache/owned", 1000, 1001)
    os.chmod(rootfs / "var", 0o1777)


def _layer2(rootfs: Path) -> None:
    (rootfs / "etc/changed").write_bytes(b"version 2\n")
    (rootfs / "etc/deleted").unlink()
    shutil.rmtree(rootfs / "gone")
    shutil.rmtree(rootfs / "opt/old")
    (rootfs / "opt/old").mkdir()
    (rootfs / "opt/old/new").write_bytes(b"recreated\n")
    (rootfs / "usr/bin/tool").unlink()
    (rootfs / "usr/bin/tool").mkdir()  # a file became a directory
    (rootfs / "usr/bin/tool/README").write_bytes(b"now a dir\n")
    os.chmod(rootfs / "etc/keep", 0o600)  # metadata-only change
    os.setxattr(rootfs / "etc/keep", "user.comment", b"changed")


def _layer3(rootfs: Path) -> None:
    (rootfs / "usr/bin/keep-link").unlink()
    (rootfs / "var/cache/new").write_bytes(b"layer 3\n")
    os.symlink("/etc/keep", rootfs / "etc/abs-link")


@pytest.fixture(scope="module")
def umoci_layout(tmp_path_factory: pytest.TempPathFactory) -> UmociLayout:
    if UMOCI is None:
        pytest.skip("umoci not installed (Debian: apt-get install umoci)")
    if os.geteuid() != 0:
        pytest.skip("the umoci layers hold devices, owners and security.capability: needs root")
    tmp = tmp_path_factory.mktemp("umoci")
    layout = tmp / "layout"
    bundle = tmp / "bundle"
    _sh(UMOCI, "init", "--layout", layout)
    _sh(UMOCI, "new", "--image", f"{layout}:v0")
    _sh(UMOCI, "unpack", "--image", f"{layout}:v0", bundle)
    for i, step in enumerate((_layer1, _layer2, _layer3), start=1):
        step(bundle / "rootfs")
        _stamp_tree(bundle / "rootfs", STAMP + i * 1_000_000_007)
        # --refresh-bundle: the next repack diffs against this one, making one layer each.
        _sh(UMOCI, "repack", "--refresh-bundle", "--image", f"{layout}:v{i}", bundle)
    # A second chain with `umoci insert` (plain, --whiteout, --opaque) on top of v1.
    ins = tmp / "insert-src"
    (ins / "a").mkdir(parents=True)
    (ins / "a" / "x").write_bytes(b"inserted\n")
    (ins / "opt").mkdir()
    (ins / "opt" / "only").write_bytes(b"opaque insert\n")
    _stamp_tree(ins)
    _sh(UMOCI, "tag", "--image", f"{layout}:v1", "ins")
    _sh(UMOCI, "insert", "--image", f"{layout}:ins", ins / "a", "/srv/a")
    _sh(UMOCI, "insert", "--image", f"{layout}:ins", "--whiteout", "/etc/changed")
    _sh(UMOCI, "insert", "--image", f"{layout}:ins", "--opaque", ins / "opt", "/opt")
    return UmociLayout(layout, tmp)


def _manifest_layers(layout: Path, tag: str) -> list[dict[str, Any]]:
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    manifest = json.loads((layout / "blobs/sha256" / desc["digest"][7:]).read_text())
    layers: list[dict[str, Any]] = manifest["layers"]
    return layers


def _layer_entries(layout: Path, tag: str) -> dict[bytes, int]:
    """Image path → mtime_ns of the last tar entry for it in the image's layers (whiteouts are
    not entries for a path). Read with Python's tarfile, independently of nydusfs."""
    entries: dict[bytes, int] = {}
    for layer in _manifest_layers(layout, tag):
        assert layer["mediaType"].endswith("+gzip"), layer
        data = gzip.decompress((layout / "blobs/sha256" / layer["digest"][7:]).read_bytes())
        data += bytes(-len(data) % 512 + 1024)  # `umoci insert` omits padding and end blocks
        with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8",
                          errors="surrogateescape") as tar:
            for m in tar:
                comps = [c for c in m.name.encode("utf-8", "surrogateescape").split(b"/")
                         if c not in (b"", b".")]
                if comps and comps[-1].startswith(b".wh."):
                    continue
                mtime = Decimal(m.pax_headers.get("mtime", m.mtime))
                entries[b"/" + b"/".join(comps)] = int(mtime * 10**9)
    return entries


@needs_umoci
@pytest.mark.parametrize("tag", ["v1", "v2", "v3", "ins"])
def test_umoci_image_equals_umoci_unpack(umoci_layout: UmociLayout, tmp_path: Path,
                                         tag: str) -> None:
    res = build_image([f"oci:{umoci_layout.path}:{tag}"], tmp_path / "out")
    rootfs = umoci_layout.unpack(tag)
    with Bootstrap.open(tmp_path / "out" / "bootstrap") as boot:
        check_image(boot, tmp_path / "out" / "blobs")
        got = image_snapshot(boot, tmp_path / "out" / "blobs")
        want = snapshot_tree(rootfs)
        # Directories no layer has an entry for (`umoci insert /srv/a` writes srv/a but not
        # srv) have no recorded mtime: the image gives them 0, while `umoci unpack` mkdirs them
        # at the current time -- which also bumps the mtime of the directory they are made in,
        # and the inserting layer has no entry for that one either to restore it (the image
        # keeps the mtime of its last entry). Those mtimes, and no other attribute or path, are
        # left out of the comparison; v1-v3 (umoci repack: an entry for every directory) have
        # none, and the set is pinned so that it cannot grow unnoticed.
        entries = _layer_entries(umoci_layout.path, tag)
        implicit = {p for p, a in got.items() if a["type"] == "dir" and p not in entries}
        made_in = {p.rpartition(b"/")[0] or b"/" for p in implicit}
        assert implicit | made_in == ({b"/", b"/srv"} if tag == "ins" else set())
        for p in implicit | made_in:
            assert got[p]["mtime_ns"] == (0 if p in implicit else entries[p]), p
            assert want[p]["mtime_ns"] != got[p]["mtime_ns"], p  # (else nothing to excuse)
            del got[p]["mtime_ns"], want[p]["mtime_ns"]
        assert_snapshots_equal(got, want)
        plain = blob_plaintext(boot, tmp_path / "out" / "blobs") if boot.blob_count else b""
        # Spot checks, so that the comparison above is known to cover what matters.
        paths = {p for p, _ in boot.walk()}
        keep = boot.resolve("usr/bin/keep")
        if tag == "v1":
            assert boot.getxattr(boot.resolve("usr/bin/ping"), b"security.capability") == \
                CAP_NET_RAW
            assert b"/gone/sub/file" in paths and keep.nlink == 2
            assert boot.resolve(b"etc/\xff\xfe-name").is_reg()
            assert os.major(boot.resolve("dev/null").rdev) == 1
        if tag in ("v2", "v3"):
            assert b"/gone" not in paths and b"/etc/deleted" not in paths
            assert sorted(e.name for e in boot.readdir(boot.resolve("opt/old"))) == [b"new"]
            assert boot.resolve("usr/bin/tool").is_dir()
            assert boot.getxattr(boot.resolve("etc/keep"), b"user.comment") == b"changed"
            assert keep.nlink == (2 if tag == "v2" else 1)
        if tag == "v3":
            assert boot.readlink(boot.resolve("etc/abs-link")) == b"/etc/keep"
        if tag == "ins":
            assert read_file(boot, tmp_path / "out" / "blobs", "srv/a/x") == b"inserted\n"
            assert b"/etc/changed" not in paths
            assert sorted(e.name for e in boot.readdir(boot.resolve("opt"))) == [b"only"]
    expected_layers = {"v1": 1, "v2": 2, "v3": 3, "ins": 4}[tag]
    assert len(_manifest_layers(umoci_layout.path, tag)) == expected_layers
    if tag in ("v2", "v3"):
        for marker in (b"MARKER-V1-CHANGED", b"MARKER-DELETED", b"MARKER-GONE-DIR",
                       b"MARKER-OPAQUE-OLD", b"MARKER-BIG"):
            assert marker not in plain, marker
        assert res.bytes_out < MiB + 64 * 1024  # usr/bin/keep and small files only
    if tag == "ins":
        assert b"MARKER-V1-CHANGED" not in plain and b"MARKER-OPAQUE-OLD" not in plain


@needs_umoci
def test_umoci_layers_really_contain_whiteouts(umoci_layout: UmociLayout) -> None:
    """Guard the fixture: umoci wrote whiteouts for what layer 2 deleted."""
    layers = _manifest_layers(umoci_layout.path, "v2")
    raw = (umoci_layout.path / "blobs/sha256" / layers[1]["digest"][7:]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(raw))) as tar:
        names = tar.getnames()
    assert any(n.endswith(".wh.deleted") for n in names), names
    assert any(n.endswith(".wh.gone") for n in names), names


@needs_umoci
@needs_skopeo
@pytest.mark.parametrize("how", ["zstd", "docker-v2s2"])
def test_skopeo_rewritten_layout_gives_the_same_tree(
    umoci_layout: UmociLayout, tmp_path: Path, how: str
) -> None:
    dst = tmp_path / "copy"
    opts = ["--dest-compress-format", "zstd"] if how == "zstd" else ["--format", "v2s2"]
    _sh(SKOPEO or "skopeo", "copy", "-q", *opts, f"oci:{umoci_layout.path}:v3", f"oci:{dst}:v3")
    media = {layer["mediaType"] for layer in _manifest_layers(dst, "v3")}
    assert media == ({"application/vnd.oci.image.layer.v1.tar+zstd"} if how == "zstd"
                     else {"application/vnd.docker.image.rootfs.diff.tar.gzip"})
    original = build_image([f"oci:{umoci_layout.path}:v3"], tmp_path / "orig")
    copied = build_image([f"oci:{dst}:v3"], tmp_path / "out")
    assert copied.root_digest == original.root_digest
    assert (tmp_path / "out/bootstrap").read_bytes() == (tmp_path / "orig/bootstrap").read_bytes()


# ---- layouts written by hand ----------------------------------------------------------------

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_MT = {
    "tar": "application/vnd.oci.image.layer.v1.tar",
    "gz": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zst": "application/vnd.oci.image.layer.v1.tar+zstd",
}
REF = "org.opencontainers.image.ref.name"


class Layout:
    """A minimal OCI image layout writer."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.manifests: list[dict[str, Any]] = []

    def blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / "sha256" / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    def path_of(self, desc: dict[str, Any]) -> Path:
        return self.root / "blobs" / "sha256" / str(desc["digest"])[7:]

    def image(self, layers: list[tuple[list[Member], str]], arch: str = "amd64"
              ) -> dict[str, Any]:
        return self.image_of_blobs([(compress(tar_bytes(members), kind), kind)
                                    for members, kind in layers], arch)

    def image_of_blobs(self, layers: list[tuple[bytes, str]], arch: str = "amd64"
                       ) -> dict[str, Any]:
        """An image whose layers are the given bytes, as they are (each named by its digest)."""
        config = self.blob(json.dumps({"architecture": arch, "os": "linux",
                                       "rootfs": {"type": "layers", "diff_ids": []}}).encode(),
                           MT_CONFIG)
        descs = [self.blob(data, LAYER_MT[kind]) for data, kind in layers]
        manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config,
                    "layers": descs}
        return self.blob(json.dumps(manifest).encode(), MT_MANIFEST)

    def layers_of(self, manifest: dict[str, Any]) -> list[dict[str, Any]]:
        layers: list[dict[str, Any]] = json.loads(self.path_of(manifest).read_text())["layers"]
        return layers

    def tag(self, desc: dict[str, Any], name: str | None) -> None:
        entry = dict(desc)
        if name is not None:
            entry["annotations"] = {REF: name}
        self.manifests.append(entry)
        (self.root / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "manifests": self.manifests}))


def _layers() -> list[tuple[list[Member], str]]:
    return [
        ([dir_("etc"), reg("etc/a", b"a1"), reg("etc/gone", b"MARKER-DELETED"),
          dir_("d"), reg("d/x", b"MARKER-OPAQUE"), sym("link", "etc/a")], "gz"),
        ([whiteout("etc/gone"), reg("etc/a", b"a2", mode=0o600),
          reg("d/.wh..wh..opq"), reg("d/y", b"y")], "zst"),
        ([reg("etc/b", b"b3", xattrs={"user.k": b"v"})], "tar"),
    ]


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Layout]:
    lay = Layout(tmp_path / "layout")
    lay.tag(lay.image(_layers()), "latest")
    yield lay


def _paths(out: Path) -> list[bytes]:
    with Bootstrap.open(out / "bootstrap") as boot:
        return sorted(p for p, _ in boot.walk())


def test_handwritten_gzip_zstd_and_plain_layers(layout: Layout, tmp_path: Path) -> None:
    res = build_image([f"oci:{layout.root}:latest"], tmp_path / "out")
    assert _paths(tmp_path / "out") == [b"/", b"/d", b"/d/y", b"/etc", b"/etc/a", b"/etc/b",
                                        b"/link"]
    with Bootstrap.open(tmp_path / "out" / "bootstrap") as boot:
        blobs = tmp_path / "out" / "blobs"
        assert read_file(boot, blobs, "etc/a") == b"a2"
        assert stat.S_IMODE(boot.resolve("etc/a").mode) == 0o600
        assert boot.getxattr(boot.resolve("etc/b"), b"user.k") == b"v"
        plain = blob_plaintext(boot, blobs)
        assert b"MARKER" not in plain
        check_image(boot, blobs)
    # The same layers given as tar files build the same image.
    tars = []
    for i, (members, kind) in enumerate(_layers()):
        p = tmp_path / f"l{i}.{kind}"
        p.write_bytes(compress(tar_bytes(members), kind))
        tars.append(p)
    assert build_image(tars, tmp_path / "tars").root_digest == res.root_digest
    # Without a tag: the only image is used.
    assert build_image([f"oci:{layout.root}"], tmp_path / "notag").root_digest == res.root_digest


def test_several_images_need_a_tag(layout: Layout, tmp_path: Path) -> None:
    layout.tag(layout.image([([reg("other", b"o")], "gz")]), "other")
    with pytest.raises(SourceError, match="latest") as info:
        build_image([f"oci:{layout.root}"], tmp_path / "out")
    assert "other" in str(info.value)
    assert _paths_of_tag(layout, "other", tmp_path) == [b"/", b"/other"]


def _paths_of_tag(layout: Layout, tag: str, tmp_path: Path) -> list[bytes]:
    build_image([f"oci:{layout.root}:{tag}"], tmp_path / f"out-{tag}")
    return _paths(tmp_path / f"out-{tag}")


def test_unknown_tag_is_a_source_error(layout: Layout, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="nope"):
        build_image([f"oci:{layout.root}:nope"], tmp_path / "out")
    assert not (tmp_path / "out" / "bootstrap").exists()
    res = run_cli("build", f"oci:{layout.root}:nope", "-o", tmp_path / "out")
    assert_clean_error(res, "nope")


def test_unknown_tag_error_lists_known_tags(layout: Layout, tmp_path: Path) -> None:
    layout.tag(layout.image([([reg("other", b"o")], "gz")]), "other")
    layout.tag(layout.image([([reg("untagged", b"u")], "gz")]), None)
    with pytest.raises(SourceError, match="nope") as info:
        build_image([f"oci:{layout.root}:nope"], tmp_path / "out")
    assert "'latest'" in str(info.value) and "'other'" in str(info.value)
    assert_clean_error(run_cli("build", f"oci:{layout.root}:nope", "-o", tmp_path / "out"),
                       "nope", "'latest'", "'other'")
    assert not (tmp_path / "out" / "bootstrap").exists()


def test_corrupt_plain_layer_is_an_integrity_error(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "layout")
    manifest = lay.image([([reg("f", b"original content " * 100)], "tar")])
    lay.tag(manifest, "t")
    layer_desc = json.loads(lay.path_of(manifest).read_text())["layers"][0]
    path = lay.path_of(layer_desc)
    data = bytearray(path.read_bytes())
    data[data.index(b"original")] ^= 0x20  # inside the file data: the tar still parses
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=layer_desc["digest"][:19]):
        build_image([f"oci:{lay.root}:t"], tmp_path / "out")
    assert not (tmp_path / "out" / "bootstrap").exists()
    assert_clean_error(run_cli("build", f"oci:{lay.root}:t", "-o", tmp_path / "out"),
                       "does not match")


@pytest.mark.parametrize("which", [0, 1], ids=["gzip", "zstd"])
def test_any_corrupt_compressed_layer_is_an_integrity_error(
    layout: Layout, tmp_path: Path, which: int
) -> None:
    """Whatever a one-bit flip does to decompression, the error names the real cause: the
    layer's digest does not match (checked before the parse error is reported)."""
    manifest = json.loads(layout.path_of(layout.manifests[0]).read_text())
    digest = manifest["layers"][which]["digest"]
    path = layout.path_of(manifest["layers"][which])
    original = path.read_bytes()
    wrong: list[tuple[int, str]] = []
    for pos in range(len(original)):
        data = bytearray(original)
        data[pos] ^= 0x01
        path.write_bytes(bytes(data))
        try:
            build_image([f"oci:{layout.root}:latest"], tmp_path / "out")
        except IntegrityError as exc:
            if digest[:19] not in str(exc) or (tmp_path / "out" / "bootstrap").exists():
                wrong.append((pos, f"IntegrityError: {exc}"))
            continue
        except NydusfsError as exc:
            wrong.append((pos, str(exc)))
        else:
            wrong.append((pos, "built"))
    assert not wrong, f"{len(wrong)} positions, e.g. {wrong[:3]}"


# ---- layers without an end-of-archive marker ------------------------------------------------
#
# A plain tar file must end with the end-of-archive blocks, or it counts as truncated. A layer
# in an OCI layout is named by its digest, so a writer that stops right after the last member
# (Debian 12's `umoci insert`) cannot have lost anything: such layers build, as Go's archive/tar
# and containerd accept them. Cut inside a header or inside file data, though, a layer is broken
# whatever its digest says.

CUT_MEMBERS = [
    dir_("d"),
    reg("d/a", b"A" * 10),
    reg("d/b", random.Random(11).randbytes(2000), mtime_pax="1700000000.5"),  # with a pax header
    sym("d/s", "a"),
    hardlink("h", "d/a"),
    reg("z", b"Z" * 700),
]


def _spans(data: bytes) -> list[tuple[int, int, int]]:
    """(first header, data start, data end) of each member, in archive order."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(m.offset, m.offset_data, m.offset_data + (m.size if m.isreg() else 0))
                for m in tar.getmembers()]


def _padded(end: int) -> int:
    return -(-end // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _one_layer_image(root: Path, blob: bytes, kind: str) -> tuple[str, dict[str, Any]]:
    """A layout at ``root`` whose only image (tag ``t``) has ``blob`` as its layer."""
    lay = Layout(root)
    manifest = lay.image_of_blobs([(blob, kind)])
    lay.tag(manifest, "t")
    desc = lay.layers_of(manifest)[0]
    # The descriptor names these very bytes: the digest check passes whatever they hold.
    assert hashlib.sha256(lay.path_of(desc).read_bytes()).hexdigest() == desc["digest"][7:]
    return f"oci:{root}:t", desc


@pytest.fixture(scope="module")
def prefix_digests(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Root digest of the image of the first k members of CUT_MEMBERS (a complete tar file)."""
    tmp = tmp_path_factory.mktemp("prefixes")
    digests = []
    for k in range(len(CUT_MEMBERS) + 1):
        (tmp / f"{k}.tar").write_bytes(tar_bytes(CUT_MEMBERS[:k]))
        digests.append(build_image([tmp / f"{k}.tar"], tmp / f"out{k}").root_digest)
    assert len(set(digests)) == len(digests)
    return digests


@pytest.mark.parametrize("kind", ["tar", "gz", "zst"])
def test_cut_at_member_boundary_rejected_as_file_accepted_in_layout(
    tmp_path: Path, kind: str, prefix_digests: list[str]
) -> None:
    """The same bytes, cut where a member ends (no end-of-archive blocks): a SourceError as a
    tar file, the first k members' image as a digest-verified OCI layer."""
    data = tar_bytes(CUT_MEMBERS)
    spans = _spans(data)
    assert len(spans) == len(CUT_MEMBERS)
    cuts = {spans[k][0]: k for k in range(1, len(spans))}  # just before the next header
    cuts[_padded(spans[-1][2])] = len(spans)  # after the last member's padding
    cuts[spans[-1][2]] = len(spans)  # right after its last data byte, as `umoci insert` does
    assert spans[-1][2] % tarfile.BLOCKSIZE != 0
    for cut, k in sorted(cuts.items()):
        blob = compress(data[:cut], kind)
        layer = tmp_path / f"cut{cut}.{kind}"
        layer.write_bytes(blob)
        with pytest.raises(SourceError, match=r"truncated|end of data") as info:
            build_image([layer], tmp_path / f"file{cut}")
        assert str(layer) in str(info.value)
        assert not (tmp_path / f"file{cut}" / "bootstrap").exists()
        ref, _ = _one_layer_image(tmp_path / f"layout{cut}", blob, kind)
        res = build_image([ref], tmp_path / f"oci{cut}")
        assert res.root_digest == prefix_digests[k], (cut, k)
        with Bootstrap.open(tmp_path / f"oci{cut}" / "bootstrap") as boot:
            check_image(boot, tmp_path / f"oci{cut}" / "blobs")


@pytest.mark.parametrize("kind", ["tar", "gz", "zst"])
def test_verified_layer_cut_inside_file_data_is_rejected(tmp_path: Path, kind: str) -> None:
    """Cut inside a regular file's data -- a byte short, or more than the padding the reader
    may supply (3 blocks) -- the layer fails although its digest matches."""
    data = tar_bytes(CUT_MEMBERS)
    cuts = set()
    for _, start, end in _spans(data):
        if end > start:
            cuts |= {start + 1, (start + end) // 2, end - 1}
    assert len(cuts) == 9
    for cut in sorted(cuts):
        ref, desc = _one_layer_image(tmp_path / f"layout{cut}", compress(data[:cut], kind), kind)
        with pytest.raises(SourceError) as info:
            build_image([ref], tmp_path / "out")
        assert desc["digest"][:19] in str(info.value), cut
        assert not (tmp_path / "out" / "bootstrap").exists()
    line = assert_clean_error(run_cli("build", ref, "-o", tmp_path / "out"), desc["digest"][:19])
    assert "end" in line
    assert not (tmp_path / "out" / "bootstrap").exists()


def test_verified_layer_builds_exactly_when_cut_between_members(
    tmp_path: Path, prefix_digests: list[str]
) -> None:
    """Cut points all over the archive: the layer builds iff no member is cut (a cut at a
    header, or after a member's data, in its padding or beyond), giving the members before it;
    a cut inside a header (pax ones included) or inside data is a SourceError."""
    data = tar_bytes(CUT_MEMBERS)
    spans = _spans(data)

    def whole_members(cut: int) -> int | None:
        if cut >= _padded(spans[-1][2]):
            return len(spans)
        for k, (header, _, end) in enumerate(spans):
            if cut == header:
                return k
            if end <= cut <= _padded(end):
                return k + 1
        return None

    marks = {o + d for span in spans for o in span for d in (-1, 0, 1)}
    cuts = sorted({*range(0, len(data) + 1, 37), *marks, _padded(spans[-1][2]) + 1024})
    outcomes: dict[str, int] = {}
    for cut in cuts:
        if not 0 <= cut <= len(data):
            continue
        want = whole_members(cut)
        ref, _ = _one_layer_image(tmp_path / f"layout{cut}", data[:cut], "tar")
        out = tmp_path / f"out{cut}"
        if want is None:
            with pytest.raises(SourceError):
                build_image([ref], out)
            assert not (out / "bootstrap").exists(), cut
        else:
            assert build_image([ref], out).root_digest == prefix_digests[want], cut
        key = "rejected" if want is None else f"{want} members"
        outcomes[key] = outcomes.get(key, 0) + 1
        shutil.rmtree(tmp_path / f"layout{cut}")
        shutil.rmtree(out, ignore_errors=True)
    # Both outcomes, and every prefix length, were exercised.
    assert outcomes["rejected"] > 100
    assert all(outcomes.get(f"{k} members") for k in range(len(spans) + 1)), outcomes


def test_verified_layer_with_huge_unknown_member_fails_fast(tmp_path: Path) -> None:
    """The reader pads a verified layer with zero blocks at its end; a member declaring 2**60
    bytes must still not make tarfile read (padding, then nothing) forever."""
    ti = tarfile.TarInfo("volume-label")
    ti.type = b"V"
    ti.size = 1 << 60
    blob = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + b"short"
    ref, desc = _one_layer_image(tmp_path / "layout", compress(blob, "gz"), "gz")
    try:
        res = run_cli("build", ref, "-o", tmp_path / "out", timeout=120)  # hang guard
    except subprocess.TimeoutExpired:
        pytest.fail("nydusfs build still running after 120 s on a tiny layer")
    assert_clean_error(res, desc["digest"][:19])
    assert not (tmp_path / "out" / "bootstrap").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_damaged_layer_blob_fails_cleanly(layout: Layout, tmp_path: Path, damage: str) -> None:
    manifest = json.loads(layout.path_of(layout.manifests[0]).read_text())
    for layer in manifest["layers"]:
        path = layout.path_of(layer)
        original = path.read_bytes()
        data = {"flip": original[:-20] + bytes([original[-20] ^ 0x01]) + original[-19:],
                "truncate": original[:-7], "append": original + b"\x00" * 512}[damage]
        path.write_bytes(data)
        with pytest.raises(NydusfsError):
            build_image([f"oci:{layout.root}:latest"], tmp_path / "out")
        assert not (tmp_path / "out" / "bootstrap").exists()
        path.write_bytes(original)


def test_edited_manifest_is_an_integrity_error(layout: Layout, tmp_path: Path) -> None:
    path = layout.path_of(layout.manifests[0])
    path.write_bytes(path.read_bytes().replace(b'"schemaVersion": 2', b'"schemaVersion":  2'))
    with pytest.raises(IntegrityError):
        build_image([f"oci:{layout.root}:latest"], tmp_path / "out")


def test_missing_layer_blob_is_a_source_error(layout: Layout, tmp_path: Path) -> None:
    manifest = json.loads(layout.path_of(layout.manifests[0]).read_text())
    layout.path_of(manifest["layers"][1]).unlink()
    with pytest.raises(SourceError, match="missing"):
        build_image([f"oci:{layout.root}:latest"], tmp_path / "out")


def test_manifest_that_is_not_an_image(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "layout")
    config = lay.blob(b'{"architecture": "amd64", "os": "linux"}', MT_CONFIG)
    lay.tag(config, "config")
    artifact = lay.blob(json.dumps({"schemaVersion": 2, "mediaType": MT_MANIFEST,
                                    "config": config}).encode(), MT_MANIFEST)
    lay.tag(artifact, "nolayers")
    helm = lay.blob(json.dumps({"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config,
                                "layers": [lay.blob(b"chart", "application/vnd.cncf.helm."
                                                              "chart.content.v1.tar+gzip")]}
                               ).encode(), MT_MANIFEST)
    lay.tag(helm, "helm")
    for tag, fragment in (("config", "not an image manifest"), ("nolayers", "layers"),
                          ("helm", "media type")):
        with pytest.raises(SourceError, match=fragment):
            build_image([f"oci:{lay.root}:{tag}"], tmp_path / "out")
        assert_clean_error(run_cli("build", f"oci:{lay.root}:{tag}", "-o", tmp_path / "out"),
                           fragment)


def test_image_index_picks_linux_amd64(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "layout")
    images = {arch: lay.image([([reg("arch", arch.encode())], "gz")], arch)
              for arch in ("arm64", "amd64", "s390x")}
    index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [
        dict(images[arch], platform={"os": "linux", "architecture": arch})
        for arch in ("arm64", "amd64", "s390x")]}
    lay.tag(lay.blob(json.dumps(index).encode(), MT_INDEX), "multi")
    build_image([f"oci:{lay.root}:multi"], tmp_path / "out")
    with Bootstrap.open(tmp_path / "out" / "bootstrap") as boot:
        assert read_file(boot, tmp_path / "out" / "blobs", "arch") == b"amd64"
    # An index without linux/amd64 (and more than one entry) is an error naming the platform.
    other = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [
        dict(images[a], platform={"os": "linux", "architecture": a}) for a in ("arm64", "s390x")]}
    lay.tag(lay.blob(json.dumps(other).encode(), MT_INDEX), "noamd64")
    with pytest.raises(SourceError, match="linux/amd64"):
        build_image([f"oci:{lay.root}:noamd64"], tmp_path / "out2")


def test_nested_indexes_are_bounded(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "layout")
    desc = lay.image([([reg("f", b"x")], "gz")])
    for _ in range(6):
        idx = {"schemaVersion": 2, "manifests": [
            dict(desc, platform={"os": "linux", "architecture": "amd64"})]}
        desc = lay.blob(json.dumps(idx).encode(), MT_INDEX)
    lay.tag(desc, "deep")
    with pytest.raises(SourceError):
        build_image([f"oci:{lay.root}:deep"], tmp_path / "out")


@pytest.mark.parametrize("digest", [
    "sha256:../../../../etc/passwd", "sha512:" + "a" * 128, "sha256:" + "A" * 64, "sha256:"])
def test_bad_descriptors_never_open_paths(tmp_path: Path, digest: str) -> None:
    lay = Layout(tmp_path / "layout")
    lay.tag({"mediaType": MT_MANIFEST, "digest": digest, "size": 10}, "bad")
    with pytest.raises(SourceError, match="digest"):
        build_image([f"oci:{lay.root}:bad"], tmp_path / "out")


def test_not_a_layout(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError):
        build_image([f"oci:{tmp_path / 'empty'}:x"], tmp_path / "out")
    with pytest.raises(SourceError):
        build_image([f"oci:{tmp_path / 'missing'}"], tmp_path / "out")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (tmp_path / "junk" / "index.json").write_text("[not json")
    res = run_cli("build", f"oci:{tmp_path / 'junk'}", "-o", tmp_path / "out")
    assert_clean_error(res, "JSON")
