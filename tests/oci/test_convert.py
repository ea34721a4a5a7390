"""``nydusfs convert`` against a real docker-registry, checked through a real mount.

A multi-layer image is made with umoci (files added, changed and deleted across layers, real
whiteouts) and pushed with skopeo; it is converted with the CLI, mounted from the registry with
the CLI, and the mounted tree is compared attribute by attribute and byte by byte with what
``umoci unpack`` makes of the pushed source. The registry's access log shows what was read
and written: a mount fetches only the chunks that are read, and a second version converted
with a chunk dictionary uploads only its new chunks.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from builder.helpers import assert_snapshots_equal
from fs.conftest import NydusMount
from registry_server import RegistryServer, push_oci_dirs
from treegen import snapshot_tree

from nydusfs.oci.image import (
    ANN_BOOTSTRAP_DIGEST,
    ANN_ROOT_DIGEST,
    ANN_SOURCE,
    MEDIA_BLOB,
    MEDIA_BOOTSTRAP_ZSTD,
)

from .images import (
    RUNTIME_CONFIG,
    RefMount,
    SourceImage,
    blob_gets,
    make_layers,
    nydusfs,
    pull_config,
    pull_manifest,
    push_source,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="umoci layers keep owners: needs root"),
    pytest.mark.skipif(not (shutil.which("umoci") and shutil.which("skopeo")),
                       reason="needs umoci and skopeo (apt-get install umoci skopeo)"),
]

DST = "conv/nydus"
KiB = 1 << 10
MiB = 1 << 20


@dataclass(frozen=True)
class Converted:
    source: SourceImage
    ref: str  # host/conv/nydus:v1
    summary: dict[str, Any]  # convert --json
    out: Path  # convert --output


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def source_v1(registry: RegistryServer, work: Path) -> SourceImage:
    return push_source(registry, work, "conv/src", "v1", make_layers(work / "v1"),
                       RUNTIME_CONFIG)


@pytest.fixture(scope="module")
def converted(registry: RegistryServer, source_v1: SourceImage, work: Path) -> Converted:
    ref = f"{registry.host}/{DST}:v1"
    out = work / "out-v1"
    proc = nydusfs("convert", source_v1.ref, ref, "--json", "-o", out)
    assert proc.returncode == 0, proc.stderr
    return Converted(source_v1, ref, json.loads(proc.stdout), out)


@pytest.fixture
def mount_ref(tmp_path: Path) -> Iterator[Any]:
    """Mount an image reference with ``nydusfs mount REF --background``; unmounted at the end."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    mounts: list[NydusMount] = []

    def mount(ref: str, **config: Any) -> NydusMount:
        cfg = tmp_path / f"mount{len(mounts)}.yaml"
        doc = {"cache": {"dir": str(tmp_path / f"cache{len(mounts)}")}, **config}
        cfg.write_text(json.dumps(doc))
        m = RefMount(ref, tmp_path / f"mnt{len(mounts)}", "--config", cfg)
        mounts.append(m)
        return m

    yield mount
    for m in reversed(mounts):
        m.close()


def test_convert_summary(converted: Converted) -> None:
    s = converted.summary
    assert s["source"].endswith(f"conv/src@{converted.source.digest}")
    assert s["reference"].startswith(converted.ref + "@sha256:")
    assert s["source_layers"] == 3
    assert s["layers"] == 2 and s["blobs_uploaded"] == 2  # one blob + the bootstrap
    # Deleted and overwritten data is not stored: the blob holds the final tree only.
    blob = converted.out / "blobs" / s["build"]["blobs"][0]["digest"].split(":")[1]
    plain = blob.read_bytes()
    for marker in (b"MARKER-OLD-CONTENT", b"MARKER-DELETED", b"MARKER-GONE-DIR",
                   b"MARKER-OPAQUE-OLD"):
        assert marker not in plain, marker
    assert s["bytes_uploaded"] >= blob.stat().st_size
    assert s["bytes_downloaded"] >= s["source_bytes"]


def test_mount_from_registry_matches_source(converted: Converted, registry: RegistryServer,
                                            mount_ref: Any) -> None:
    since = len(registry.access_log())
    m = mount_ref(converted.ref, read={"readahead_chunks": 0, "merge_window": 0})
    manifest = pull_manifest(registry, DST, "v1")
    blob_digest = manifest["layers"][0]["digest"]
    boot_digest = manifest["layers"][-1]["digest"]
    # Mounting fetched the bootstrap and no blob data.
    fetched = blob_gets(registry, since, DST)
    assert fetched.get(boot_digest) == manifest["layers"][-1]["size"]
    assert blob_digest not in fetched

    # One small file read: only its chunk comes over the wire, not the 3 MiB library.
    assert (m.mnt / "etc/keep").read_bytes() == b"unchanged\n"
    fetched = blob_gets(registry, since, DST)
    assert 0 < fetched[blob_digest] < 4 * KiB, fetched

    # Then everything: the tree is the one umoci unpacks from the source image.
    assert_snapshots_equal(snapshot_tree(m.mnt), snapshot_tree(converted.source.rootfs))
    fetched = blob_gets(registry, since, DST)
    assert fetched[blob_digest] <= manifest["layers"][0]["size"]  # each chunk fetched once
    assert not (m.mnt / "etc/deleted").exists() and not (m.mnt / "var/tmp-gone").exists()
    assert os.listdir(m.mnt / "opt/old") == ["new"]


def test_convert_keeps_the_runtime_config(converted: Converted,
                                          registry: RegistryServer) -> None:
    src_manifest = pull_manifest(registry, "conv/src", "v1")
    src_config = pull_config(registry, "conv/src", src_manifest)
    manifest = pull_manifest(registry, DST, "v1")
    config = pull_config(registry, DST, manifest)
    # The runtime config is carried over whole, as the source has it.
    assert config["config"] == src_config["config"]
    runtime = config["config"]
    assert runtime["Entrypoint"] == RUNTIME_CONFIG["Entrypoint"]
    assert runtime["Cmd"] == RUNTIME_CONFIG["Cmd"]
    assert runtime["Env"] == RUNTIME_CONFIG["Env"]
    assert runtime["WorkingDir"] == "/srv" and runtime["User"] == "1000:1000"
    assert runtime["ExposedPorts"] == {"8080/tcp": {}}
    assert runtime["Labels"] == RUNTIME_CONFIG["Labels"]
    assert (config["os"], config["architecture"]) == (src_config["os"],
                                                      src_config["architecture"])
    # Layers, diff_ids and history agree with each other.
    layers = manifest["layers"]
    assert [d["mediaType"] for d in layers] == [MEDIA_BLOB, MEDIA_BOOTSTRAP_ZSTD]
    boot_ann = layers[-1]["annotations"]
    assert config["rootfs"]["diff_ids"] == [layers[0]["digest"], boot_ann[ANN_BOOTSTRAP_DIGEST]]
    assert sum(not h.get("empty_layer") for h in config["history"]) == len(layers)
    assert manifest["annotations"][ANN_ROOT_DIGEST] == converted.summary["root_digest"]
    assert manifest["annotations"][ANN_SOURCE] == converted.summary["source"]


def test_generic_tools_handle_the_image(converted: Converted, registry: RegistryServer,
                                        tmp_path: Path) -> None:
    """A registry tool that knows nothing of the format copies it like any image."""
    import subprocess

    layout = tmp_path / "copy"
    subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false",
                    f"docker://{converted.ref}", f"oci:{layout}:x"], check=True,
                   capture_output=True, timeout=60)
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    assert converted.summary["reference"].endswith("@" + digest)
    proc = nydusfs("inspect", converted.ref, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["root_digest"] == converted.summary["root_digest"]
    assert info["image"]["manifest_digest"] == digest


def test_chunk_dict_uploads_only_new_chunks(converted: Converted, registry: RegistryServer,
                                            work: Path, mount_ref: Any) -> None:
    v2 = push_source(registry, work, "conv/src", "v2", make_layers(work / "v2", version=2),
                     RUNTIME_CONFIG)
    v1_blob = pull_manifest(registry, DST, "v1")["layers"][0]
    since = len(registry.access_log())
    proc = nydusfs("convert", v2.ref, f"{registry.host}/{DST}:v2", "--chunk-dict",
                   converted.ref, "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    b = s["build"]
    assert b["chunks_from_dict"] > 0 and b["chunks_new"] < b["chunks"]
    new_blob = next(x for x in b["blobs"] if x["new"])
    # New bytes: the new blob (~1 MiB of new chunks), the bootstrap layer, config, manifest.
    assert new_blob["size"] <= s["bytes_uploaded"] < new_blob["size"] + 64 * KiB
    assert s["bytes_uploaded"] < v1_blob["size"] // 2
    assert converted.summary["bytes_uploaded"] > v1_blob["size"]  # v1 uploaded everything
    sent = [e.path for e in registry.access_log()[since:] if e.method in ("PUT", "PATCH")]
    assert not any(v1_blob["digest"] in p for p in sent), sent
    manifest = pull_manifest(registry, DST, "v2")
    assert v1_blob["digest"] in [d["digest"] for d in manifest["layers"][:-1]]
    assert len(manifest["layers"]) == 3  # new blob, v1's blob, bootstrap

    m = mount_ref(f"{registry.host}/{DST}:v2")
    assert_snapshots_equal(snapshot_tree(m.mnt), snapshot_tree(v2.rootfs))

    # Into another repository: v1's blob is mounted across repositories, not uploaded.
    since = len(registry.access_log())
    proc = nydusfs("convert", v2.ref, f"{registry.host}/conv/other:v2", "--chunk-dict",
                   converted.ref, "--json")
    assert proc.returncode == 0, proc.stderr
    s2 = json.loads(proc.stdout)
    log = registry.access_log()[since:]
    assert any(e.method == "POST" and f"mount={v1_blob['digest']}" in e.path
               and e.status == 201 for e in log), [e.path for e in log]
    # Mounted, so never downloaded first: no GET of the dictionary's blob at all.
    assert not [e for e in log if e.method == "GET" and v1_blob["digest"] in e.path], \
        [e.path for e in log]
    assert s2["bytes_uploaded"] < new_blob["size"] + 64 * KiB
    assert nydusfs("check", f"{registry.host}/conv/other:v2", "--blobs").returncode == 0

    # A local bootstrap as the dictionary: its blobs beside it are found present.
    proc = nydusfs("convert", v2.ref, f"{registry.host}/{DST}:v2-local", "--chunk-dict",
                   converted.out / "bootstrap", "--json")
    assert proc.returncode == 0, proc.stderr
    s3 = json.loads(proc.stdout)
    assert s3["build"]["chunks_from_dict"] == b["chunks_from_dict"]
    assert s3["bytes_uploaded"] < new_blob["size"] + 64 * KiB


def _error_line(proc: Any) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nydusfs: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return str(lines[0])


def test_not_a_nydusfs_image(converted: Converted, registry: RegistryServer,
                             tmp_path: Path) -> None:
    src = converted.source.ref
    for args in (("inspect", src), ("check", src),
                 ("mount", src, tmp_path, "--config", _cache_config(tmp_path))):
        line = _error_line(nydusfs(*args))
        assert "not a nydusfs image" in line and "tar+gzip" in line, line
    line = _error_line(nydusfs("convert", converted.ref, f"{registry.host}/conv/again:1"))
    assert "already a nydusfs image" in line
    line = _error_line(nydusfs("inspect", f"{registry.host}/{DST}:no-such-tag"))
    assert "not found" in line or "unknown" in line.lower()


def _cache_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "m.yaml"
    cfg.write_text(json.dumps({"cache": {"dir": str(tmp_path / "cache")}}))
    return cfg


def _upload(registry: RegistryServer, repo: str, data: bytes) -> str:
    import hashlib

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    req = urllib.request.Request(f"{registry.url}/v2/{repo}/blobs/uploads/", method="POST",
                                 data=b"")
    with urllib.request.urlopen(req, timeout=30) as resp:
        location = resp.headers["Location"]
    sep = "&" if "?" in location else "?"
    url = urllib.parse.urljoin(registry.url, location) + f"{sep}digest={digest}"
    req = urllib.request.Request(url, method="PUT", data=data,
                                 headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=30):
        pass
    return digest


def test_manifest_that_is_not_an_image(registry: RegistryServer, tmp_path: Path) -> None:
    """An OCI artifact (a Helm-chart-like config type) is refused with a clear line."""
    repo = "conv/artifact"
    config = b'{"name": "chart"}'
    cfg_digest = _upload(registry, repo, config)
    layer = b"not a tar"
    layer_digest = _upload(registry, repo, layer)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json",
                   "digest": cfg_digest, "size": len(config)},
        "layers": [{"mediaType": "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
                    "digest": layer_digest, "size": len(layer)}],
    }).encode()
    req = urllib.request.Request(
        f"{registry.url}/v2/{repo}/manifests/1", method="PUT", data=manifest,
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=30):
        pass
    ref = f"{registry.host}/{repo}:1"
    for args in (("inspect", ref), ("convert", ref, f"{registry.host}/conv/art-out:1")):
        line = _error_line(nydusfs(*args))
        assert "not a container image" in line, line


def test_corrupt_source_layer_is_refused_and_nothing_pushed(registry: RegistryServer,
                                                            tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "data").mkdir(parents=True)
    (layer / "data" / "file").write_bytes(os.urandom(300_000))
    push_oci_dirs(registry.host, "conv/corrupt:1", [layer])
    manifest = pull_manifest(registry, "conv/corrupt", "1")
    stored = registry.blob_file(manifest["layers"][0]["digest"])
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, wrong content: only the digest can tell
    stored.write_bytes(bytes(data))
    dst = f"{registry.host}/conv/corrupt-out:1"
    line = _error_line(nydusfs("convert", f"{registry.host}/conv/corrupt:1", dst))
    assert "does not match" in line or "corrupt" in line, line
    with pytest.raises(urllib.error.HTTPError) as info:
        pull_manifest(registry, "conv/corrupt-out", "1")
    assert info.value.code == 404
