"""Deduplication inside one image, and across images through ``--chunk-dict``.

File contents are random (incompressible), so a blob's size says how many copies of the data it
holds: one copy of a file is ``~len(file)`` bytes of blob.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from nydusfs.errors import FormatError
from nydusfs.format.reader import Bootstrap
from nydusfs.verify import check_image

from .helpers import MiB, build_image, read_file, write_tree


def _rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_repeated_files_store_their_chunks_once(tmp_path: Path) -> None:
    payload = _rand(1, 3 * MiB + 4321)  # 4 chunks of 1 MiB (the last one short)
    files: dict[str | bytes, bytes] = {f"copy{i}/same.bin": payload for i in range(5)}
    files["copy2/deeper/again.bin"] = payload
    files["other.bin"] = _rand(2, 100_000)
    write_tree(tmp_path / "src", files)
    res = build_image([tmp_path / "src"], tmp_path / "out")

    assert res.chunks == res.chunks_new == 4 + 1
    assert res.bytes_in == 6 * len(payload) + 100_000
    assert res.dedup_saved_bytes == 5 * len(payload)
    blob = tmp_path / "out" / "blobs" / res.blobs[0]["digest"].removeprefix("sha256:")
    # One copy of the data plus a little zstd framing (random data is stored raw).
    assert len(payload) + 100_000 <= blob.stat().st_size < len(payload) + 100_000 + 4096
    assert res.bytes_out == blob.stat().st_size
    with Bootstrap.open(tmp_path / "out" / "bootstrap") as boot:
        assert boot.chunk_count == 5
        lists = {tuple(r.chunk.index for r in boot.file_chunks(boot.resolve(p)))
                 for p in files if p != "other.bin"}
        assert len(lists) == 1  # every copy points at the same four chunks
        for p, data in files.items():
            assert read_file(boot, tmp_path / "out" / "blobs", p) == data
        check_image(boot, tmp_path / "out" / "blobs")


def test_repeated_chunks_inside_one_file(tmp_path: Path) -> None:
    block = _rand(3, MiB)
    write_tree(tmp_path / "src", {"f": block * 4 + b"tail"})
    res = build_image([tmp_path / "src"], tmp_path / "out")
    assert res.chunks == 2
    with Bootstrap.open(tmp_path / "out" / "bootstrap") as boot:
        refs = boot.file_chunks(boot.resolve("f"))
        assert len(refs) == 5 and len({r.chunk.index for r in refs[:4]}) == 1
        assert read_file(boot, tmp_path / "out" / "blobs", "f") == block * 4 + b"tail"


# ---- chunk dictionary -----------------------------------------------------------------------


def _v1(root: Path) -> dict[str | bytes, bytes]:
    files: dict[str | bytes, bytes] = {
        "usr/lib/big.so": _rand(10, 6 * MiB),
        "usr/bin/tool": _rand(11, 2 * MiB + 77),
        "etc/conf": b"setting = 1\n" * 100,
    }
    write_tree(root, files)
    return files


def test_chunk_dict_stores_only_new_chunks(tmp_path: Path) -> None:
    v1_files = _v1(tmp_path / "v1src")
    r1 = build_image([tmp_path / "v1src"], tmp_path / "v1")
    v1_blob_hex = r1.blobs[0]["digest"].removeprefix("sha256:")
    v1_blob = tmp_path / "v1" / "blobs" / v1_blob_hex

    # v2: one aligned 1 MiB region of big.so rewritten, one file added.
    shutil.copytree(tmp_path / "v1src", tmp_path / "v2src", symlinks=True)
    big = bytearray(v1_files["usr/lib/big.so"])
    big[2 * MiB : 3 * MiB] = _rand(12, MiB)
    added = _rand(13, MiB + MiB // 2)
    v2_files = dict(v1_files, **{"usr/lib/big.so": bytes(big), "usr/share/new.dat": added})
    write_tree(tmp_path / "v2src", v2_files)

    r2 = build_image([tmp_path / "v2src"], tmp_path / "v2", chunk_dict=tmp_path / "v1/bootstrap")
    assert r2.chunks_new == 1 + 2  # the changed chunk + the added file's two chunks
    assert r2.chunks_from_dict == r1.chunks - 1  # everything else, minus the replaced chunk
    assert r2.chunks == r2.chunks_new + r2.chunks_from_dict
    new_blob = tmp_path / "v2" / "blobs" / r2.blobs[0]["digest"].removeprefix("sha256:")
    # The new blob holds ~2.5 MiB of new data; v1's holds ~8 MiB.
    assert 2.5 * MiB <= new_blob.stat().st_size < 2.5 * MiB + 4096
    assert v1_blob.stat().st_size > 8 * MiB
    assert [b["new"] for b in r2.blobs] == [True, False]
    assert r2.blobs[1] == {"digest": f"sha256:{v1_blob_hex}", "size": v1_blob.stat().st_size,
                           "new": False}

    # v1's blob is made available beside v2's (hardlinked on the same filesystem).
    linked = tmp_path / "v2" / "blobs" / v1_blob_hex
    assert linked.read_bytes() == v1_blob.read_bytes()
    assert os.stat(linked).st_ino == os.stat(v1_blob).st_ino
    assert sorted(p.name for p in (tmp_path / "v2" / "blobs").iterdir()) == sorted(
        [new_blob.name, v1_blob_hex])

    with Bootstrap.open(tmp_path / "v2/bootstrap") as b2, \
            Bootstrap.open(tmp_path / "v1/bootstrap") as b1:
        assert [b.hex for b in b2.blobs()] == [new_blob.name, v1_blob_hex]
        # Every chunk of the new blob is new; every dictionary chunk keeps v1's placement.
        for c in b2.chunks():
            old = b1.find_chunk(c.digest)
            if c.blob_index == 0:
                assert old is None
            else:
                assert old is not None and c.blob_index == 1
                assert (c.compressed_offset, c.compressed_size, c.flags) == (
                    old.compressed_offset, old.compressed_size, old.flags)
        check_image(b2, tmp_path / "v2" / "blobs")
        for p, data in v2_files.items():
            assert read_file(b2, tmp_path / "v2" / "blobs", p) == data
        unchanged = [r.chunk.blob_index for r in b2.file_chunks(b2.resolve("usr/bin/tool"))]
        assert unchanged == [1, 1, 1]
        big_blobs = [r.chunk.blob_index for r in b2.file_chunks(b2.resolve("usr/lib/big.so"))]
        assert big_blobs == [1, 1, 0, 1, 1, 1]


def test_chunk_dict_identical_tree_makes_no_new_blob(tmp_path: Path) -> None:
    _v1(tmp_path / "src")
    r1 = build_image([tmp_path / "src"], tmp_path / "v1")
    r2 = build_image([tmp_path / "src"], tmp_path / "v2", chunk_dict=tmp_path / "v1/bootstrap")
    assert r2.chunks_new == 0 and r2.chunks_from_dict == r1.chunks and r2.bytes_out == 0
    assert r2.root_digest == r1.root_digest
    assert [b["new"] for b in r2.blobs] == [False]
    with Bootstrap.open(tmp_path / "v2/bootstrap") as b2:
        assert [b.hex for b in b2.blobs()] == [r1.blobs[0]["digest"].removeprefix("sha256:")]
        check_image(b2, tmp_path / "v2" / "blobs")


def test_chunk_dict_chain_references_both_older_blobs(tmp_path: Path) -> None:
    """v3 built against v2 (which itself references v1's blob) finds chunks in both blobs."""
    files = _v1(tmp_path / "src")
    build_image([tmp_path / "src"], tmp_path / "v1")
    write_tree(tmp_path / "src", {"added2": _rand(20, MiB)})
    build_image([tmp_path / "src"], tmp_path / "v2", chunk_dict=tmp_path / "v1/bootstrap")
    write_tree(tmp_path / "src", {"added3": _rand(21, 100)})
    r3 = build_image([tmp_path / "src"], tmp_path / "v3", chunk_dict=tmp_path / "v2/bootstrap")
    assert r3.chunks_new == 1
    assert len(r3.blobs) == 3
    with Bootstrap.open(tmp_path / "v3/bootstrap") as b3:
        check_image(b3, tmp_path / "v3" / "blobs")
        for p, data in {**files, "added2": _rand(20, MiB), "added3": _rand(21, 100)}.items():
            assert read_file(b3, tmp_path / "v3" / "blobs", p) == data


def test_cdc_chunk_dict_survives_an_insertion(tmp_path: Path) -> None:
    """With FastCDC, bytes inserted near the start of a file do not make every chunk new."""
    data = _rand(30, 4 * MiB)
    write_tree(tmp_path / "a", {"f": data})
    write_tree(tmp_path / "b", {"f": data[:1000] + b"INSERTED" * 37 + data[1000:]})
    opts = {"chunker": "cdc", "chunk_size": 64 * 1024}
    r1 = build_image([tmp_path / "a"], tmp_path / "v1", **opts)
    r2 = build_image([tmp_path / "b"], tmp_path / "v2", chunk_dict=tmp_path / "v1/bootstrap",
                     **opts)
    assert r1.chunks > 20
    assert r2.chunks_new <= 2 and r2.chunks_from_dict >= r1.chunks - 2
    # A fixed chunker shifts every chunk after the insertion: nothing is found in the dict.
    f1 = build_image([tmp_path / "a"], tmp_path / "f1", chunk_size=64 * 1024)
    f2 = build_image([tmp_path / "b"], tmp_path / "f2", chunk_size=64 * 1024,
                     chunk_dict=tmp_path / "f1/bootstrap")
    assert f2.chunks_from_dict == 0 and f2.chunks_new == f1.chunks + 1
    with Bootstrap.open(tmp_path / "v2/bootstrap") as b2:
        check_image(b2, tmp_path / "v2" / "blobs")
        assert read_file(b2, tmp_path / "v2" / "blobs", "f") == (tmp_path / "b/f").read_bytes()


def test_chunk_dict_that_is_not_a_bootstrap_is_a_clean_error(tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"f": b"x"})
    (tmp_path / "junk").write_bytes(os.urandom(4096))
    with pytest.raises(FormatError):
        build_image([tmp_path / "src"], tmp_path / "out", chunk_dict=tmp_path / "junk")
    assert not (tmp_path / "out" / "bootstrap").exists()
