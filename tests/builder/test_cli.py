"""The ``nydusfs`` command line, run as a subprocess: build, inspect, check.

Every failure must be exit status 1 with one ``nydusfs: error:`` line and no traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest

from nydusfs.errors import FormatError
from nydusfs.format import layout as L
from nydusfs.format.reader import Bootstrap
from nydusfs.verify import check_image

from .helpers import MiB, assert_clean_error, run_cli, write_tree

BUILD_KEYS = {
    "root_digest", "bootstrap", "bootstrap_sha256", "blobs", "inodes", "files", "directories",
    "symlinks", "hardlinked_files", "chunks", "chunks_new", "chunks_from_dict", "bytes_in",
    "bytes_out", "dedup_saved_bytes", "prefetch_files", "warnings", "seconds",
}


@dataclass
class Image:
    src: Path
    out: Path
    summary: dict[str, object]

    @property
    def bootstrap(self) -> Path:
        return self.out / "bootstrap"

    @property
    def blobs(self) -> Path:
        return self.out / "blobs"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    if os.geteuid() != 0:
        pytest.skip("the CLI test tree has a device node: needs root")
    tmp = tmp_path_factory.mktemp("cli")
    src = tmp / "src"
    rng = random.Random(9)
    payload = rng.randbytes(2 * MiB + 10)
    write_tree(src, {
        "bin/tool": payload,
        "bin/tool-copy": payload,
        "etc/conf": b"key = value\n" * 1000,
        "etc/empty": b"",
        b"names/\xff\xfe": b"odd\n",
    })
    os.symlink("../etc/conf", src / "bin/conf-link")
    os.link(src / "etc/conf", src / "etc/conf-hardlink")
    os.mkfifo(src / "fifo")
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(src / "null", 0o666)
    os.setxattr(src / "etc/conf", "user.owner", b"cli-test")
    (tmp / "prefetch").write_bytes(b"/etc/conf\n")
    res = run_cli("build", src, "-o", tmp / "out", "--json", "--prefetch", tmp / "prefetch",
                  check=True)
    assert "Traceback" not in res.stderr and res.stderr == ""
    return Image(src, tmp / "out", json.loads(res.stdout))


# ---- build ----------------------------------------------------------------------------------


def test_build_json_matches_the_bootstrap(image: Image) -> None:
    s = image.summary
    assert set(s) == BUILD_KEYS
    data = image.bootstrap.read_bytes()
    assert s["bootstrap"] == str(image.bootstrap)
    assert s["bootstrap_sha256"] == hashlib.sha256(data).hexdigest()
    with Bootstrap.open(image.bootstrap) as boot:
        assert s["root_digest"] == boot.header.root_digest.hex()
        assert s["inodes"] == boot.inode_count
        nodes = {n.ino: n for _p, n in boot.walk()}
        assert s["files"] == sum(n.is_reg() for n in nodes.values()) == 5
        assert s["directories"] == sum(n.is_dir() for n in nodes.values()) == 4
        assert s["symlinks"] == sum(n.is_symlink() for n in nodes.values()) == 1
        assert s["hardlinked_files"] == 1
        assert s["chunks"] == s["chunks_new"] == boot.chunk_count
        assert s["chunks_from_dict"] == 0
        assert s["blobs"] == [{"digest": b.oci_digest, "size": b.size, "new": True}
                              for b in boot.blobs()]
        blob = image.blobs / boot.blob(0).hex
        assert s["bytes_out"] == blob.stat().st_size == boot.blob(0).size
        assert hashlib.sha256(blob.read_bytes()).digest() == boot.blob(0).sha256
        file_bytes = sum(n.size for n in nodes.values() if n.is_reg())
        assert s["bytes_in"] == file_bytes
        assert s["dedup_saved_bytes"] == 2 * MiB + 10  # the copy of bin/tool
        assert s["prefetch_files"] == len(boot.prefetch()) == 1
        assert s["warnings"] == []
        assert isinstance(s["seconds"], float | int) and s["seconds"] >= 0


def test_build_text_summary(image: Image, tmp_path: Path) -> None:
    res = run_cli("build", image.src, "-o", tmp_path / "out", check=True)
    assert f"root digest   {image.summary['root_digest']}" in res.stdout
    assert "chunks" in res.stdout and "Traceback" not in res.stderr
    assert (tmp_path / "out/bootstrap").read_bytes() != b""


@pytest.mark.parametrize(("args", "fragment"), [
    (["{tmp}/missing"], "missing"),
    (["{src}", "--chunk-size", "3M"], "power of two"),
    (["{src}", "--chunk-size", "lots"], "invalid size"),
    (["{src}", "--chunk-size", "32M"], "power of two"),
    (["{src}", "--chunker", "cdc", "--chunk-size", "8M"], "cdc"),
    (["{src}", "{src}/etc/conf"], "only source"),
    (["{src}", "--chunk-dict", "{src}/etc/conf"], "bootstrap"),
    (["{src}", "--prefetch", "{tmp}/missing.txt"], "prefetch"),
    (["{src}", "--zstd-level", "99"], "zstd-level"),
])
def test_build_errors_are_one_line(image: Image, tmp_path: Path, args: list[str],
                                   fragment: str) -> None:
    argv = [a.format(tmp=tmp_path, src=image.src) for a in args]
    res = run_cli("build", *argv, "-o", tmp_path / "out")
    assert_clean_error(res, fragment)
    assert not (tmp_path / "out" / "bootstrap").exists()


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    for argv in (["build"], ["build", str(tmp_path)], ["frobnicate"], ["check"]):
        res = run_cli(*argv)
        assert res.returncode == 2 and "usage:" in res.stderr and "Traceback" not in res.stderr


# ---- inspect --------------------------------------------------------------------------------


def test_inspect_header_text_and_json(image: Image) -> None:
    res = run_cli("inspect", image.bootstrap, "--json", check=True)
    info = json.loads(res.stdout)
    with Bootstrap.open(image.bootstrap) as boot:
        assert info["root_digest"] == boot.header.root_digest.hex()
        assert info["version"] == L.VERSION
        assert info["chunker"] == "fixed" and info["chunk_size"] == MiB
        assert info["compression"] == "zstd" and info["digest"] == "blake3"
        assert info["counts"]["inodes"] == boot.inode_count
        assert info["counts"]["chunks"] == boot.chunk_count
        assert info["blobs"] == [{"digest": b.oci_digest, "size": b.size} for b in boot.blobs()]
        assert info["prefetch"] == 1
    text = run_cli("inspect", image.bootstrap, check=True).stdout
    assert f"root_digest: {info['root_digest']}" in text
    assert f"inodes={info['counts']['inodes']}" in text


def test_inspect_paths(image: Image) -> None:
    with Bootstrap.open(image.bootstrap) as boot:
        conf = boot.resolve("etc/conf")
        info = json.loads(run_cli("inspect", image.bootstrap, "/etc/conf", "--json",
                                  check=True).stdout)
        assert info["ino"] == conf.ino and info["type"] == "file"
        assert info["size"] == conf.size == 12_000 and info["nlink"] == 2
        assert info["xattrs"] == {"user.owner": b"cli-test".hex()}
        assert info["digest"] == conf.digest.hex()
        want = [r.chunk.hex for r in boot.file_chunks(conf)]
        assert [c["digest"] for c in info["chunks"]] == want
    link = json.loads(run_cli("inspect", image.bootstrap, "bin/conf-link", "--json",
                              check=True).stdout)
    assert link["type"] == "symlink" and link["target"] == "../etc/conf"
    dev = json.loads(run_cli("inspect", image.bootstrap, "null", "--json", check=True).stdout)
    assert dev["type"] == "chardev" and dev["rdev"] == [1, 3] and dev["mode"] == "0666"
    root = json.loads(run_cli("inspect", image.bootstrap, "/", "--json", check=True).stdout)
    assert root["type"] == "dir" and root["ino"] == 1 and root["entries"] == 5
    odd = run_cli("inspect", image.bootstrap, b"names/\xff\xfe", check=True)
    assert "type: file" in odd.stdout
    big = json.loads(run_cli("inspect", image.bootstrap, "bin/tool", "--json", check=True).stdout)
    assert [c["offset"] for c in big["chunks"]] == [0, MiB, 2 * MiB]


def test_inspect_errors(image: Image, tmp_path: Path) -> None:
    assert_clean_error(run_cli("inspect", image.bootstrap, "/no/such/path"), "no such file")
    assert_clean_error(run_cli("inspect", tmp_path / "missing"), "missing")
    (tmp_path / "junk").write_bytes(os.urandom(1000))
    assert_clean_error(run_cli("inspect", tmp_path / "junk"), "magic")


# ---- check ----------------------------------------------------------------------------------


def test_check_good_image(image: Image) -> None:
    res = run_cli("check", image.bootstrap, "--blob-dir", image.blobs, check=True)
    assert res.stdout.startswith("ok: bootstrap and blobs valid")
    report = json.loads(run_cli("check", image.bootstrap, "--blob-dir", image.blobs, "--json",
                                check=True).stdout)
    with Bootstrap.open(image.bootstrap) as boot:
        assert report["root_digest"] == boot.header.root_digest.hex()
        assert report["chunks_verified"] == boot.chunk_count
    assert run_cli("check", image.bootstrap, check=True).stdout.startswith("ok: bootstrap valid")


def _bad_copy(image: Image, tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "bad-bootstrap"
    p.write_bytes(data)
    return p


def test_check_truncated_bootstraps(image: Image, tmp_path: Path) -> None:
    data = image.bootstrap.read_bytes()
    for n in (0, 1, 100, L.HEADER_SIZE - 1, L.HEADER_SIZE, L.HEADER_SIZE + 1, len(data) // 2,
              len(data) - 1):
        res = run_cli("check", _bad_copy(image, tmp_path, data[:n]))
        assert_clean_error(res)


def test_check_random_and_flipped_bootstraps(image: Image, tmp_path: Path) -> None:
    data = image.bootstrap.read_bytes()
    rng = random.Random(4)
    assert_clean_error(run_cli("check", _bad_copy(image, tmp_path, rng.randbytes(len(data)))),
                       "magic")
    assert_clean_error(run_cli("check", _bad_copy(image, tmp_path, L.MAGIC + rng.randbytes(
        len(data) - len(L.MAGIC)))))
    # Bit flips: in the magic, a table offset, the root digest, and across the body.
    body = [L.HEADER_SIZE + (len(data) - L.HEADER_SIZE) * k // 5 for k in range(5)]
    for pos in (0, 8, 40, 48, 170, *body, len(data) - 1):
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        res = run_cli("check", _bad_copy(image, tmp_path, bytes(flipped)))
        assert_clean_error(res)


def test_check_corrupt_blobs(image: Image, tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    with Bootstrap.open(image.bootstrap) as boot:
        name = boot.blob(0).hex
        chunk = next(c for c in boot.chunks() if c.blob_index == 0)
    original = (image.blobs / name).read_bytes()
    flipped = bytearray(original)
    flipped[chunk.compressed_offset + chunk.compressed_size // 2] ^= 0x01
    (blobs / name).write_bytes(bytes(flipped))
    assert_clean_error(run_cli("check", image.bootstrap, "--blob-dir", blobs), "sha256 mismatch")
    (blobs / name).write_bytes(original + b"\x00")
    assert_clean_error(run_cli("check", image.bootstrap, "--blob-dir", blobs), "bytes")
    (blobs / name).write_bytes(original[:-1])
    assert_clean_error(run_cli("check", image.bootstrap, "--blob-dir", blobs), "bytes")
    (blobs / name).unlink()
    assert_clean_error(run_cli("check", image.bootstrap, "--blob-dir", blobs), name)
    assert_clean_error(run_cli("check", image.bootstrap, "--blob-dir", tmp_path / "nope"), name)


def test_check_errors_on_paths(tmp_path: Path) -> None:
    assert_clean_error(run_cli("check", tmp_path / "missing"))
    assert_clean_error(run_cli("check", tmp_path))  # a directory


# Header offsets that a body-only digest left unchecked: flags (the CDC bit), compression, the
# reserved fields, and the reserved tail.
HEADER_ONLY_OFFSETS = [16, 29, 30, 31, 36, 39, 232, 255]


def test_check_detects_every_single_bit_flip(tmp_path: Path) -> None:
    """The header checksum covers every byte of the bootstrap (header included, the checksum
    field itself zeroed), and reserved header fields must be zero: no one-bit change passes."""
    src = tmp_path / "src"
    write_tree(src, {"f": b"hello" * 1000, "d/g": b"x"})
    os.symlink("f", src / "l")
    assert run_cli("build", src, "-o", tmp_path / "out").returncode == 0
    data = (tmp_path / "out" / "bootstrap").read_bytes()
    blobs = tmp_path / "out" / "blobs"
    check_image(Bootstrap.from_bytes(data), blobs)  # the unmodified image passes
    # The checksum field, computed independently: blake3 of everything, the field zeroed.
    field = slice(L.CHECKSUM_OFFSET, L.CHECKSUM_OFFSET + 32)
    assert data[field] == blake3.blake3(data[:field.start] + bytes(32) + data[field.stop:]).digest()
    accepted = []
    for pos in range(len(data)):
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        try:
            check_image(Bootstrap.from_bytes(bytes(flipped)), blobs)
        except FormatError:
            continue
        accepted.append(pos)
    assert accepted == []
    for pos in HEADER_ONLY_OFFSETS:  # and the command line says so
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        assert_clean_error(run_cli("check", _bad_copy_at(tmp_path, pos, bytes(flipped)),
                                   "--blob-dir", blobs))


def _bad_copy_at(tmp_path: Path, pos: int, data: bytes) -> Path:
    p = tmp_path / f"flipped-{pos}"
    p.write_bytes(data)
    return p
