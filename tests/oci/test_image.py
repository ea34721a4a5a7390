"""``oci.image``: packing a built image as an OCI manifest and recognising one (no network).

The round trip goes through the same parser the client uses for registry responses
(``Manifest.parse``), and every way a manifest or bootstrap layer can disagree with itself is
refused with a message that says what is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import zstandard

from nydusfs.builder import BuildOptions, build
from nydusfs.errors import ConfigError, FormatError, IntegrityError
from nydusfs.format.reader import Bootstrap
from nydusfs.oci.image import (
    ANN_BLOB_DIGEST,
    ANN_BOOTSTRAP,
    ANN_BOOTSTRAP_DIGEST,
    ANN_BOOTSTRAP_SIZE,
    ANN_FORMAT_VERSION,
    ANN_ROOT_DIGEST,
    MEDIA_BLOB,
    MEDIA_BOOTSTRAP,
    MEDIA_BOOTSTRAP_ZSTD,
    NydusImage,
    PackedImage,
    build_config,
    open_bootstrap_layer,
    pack_image,
    parse_image,
)
from nydusfs.oci.manifest import MEDIA_OCI_CONFIG, MEDIA_OCI_MANIFEST, Descriptor, Manifest

SOURCE_CONFIG: dict[str, Any] = {
    "created": "2024-01-02T03:04:05Z",
    "architecture": "arm64", "variant": "v8", "os": "linux",
    "config": {"Entrypoint": ["/app"], "Cmd": ["-v"], "Env": ["A=1"], "WorkingDir": "/w",
               "User": "nobody", "ExposedPorts": {"80/tcp": {}}, "Labels": {"l": "v"},
               "StopSignal": "SIGINT"},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64, "sha256:" + "2" * 64]},
    "history": [{"created_by": "RUN a"}, {"created_by": "RUN b"}],
    "container_config": {"Cmd": ["/bin/sh", "-c", "legacy"]},
    "docker_version": "20.10",
}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    tmp = tmp_path_factory.mktemp("img")
    src = tmp / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "a").write_bytes(b"alpha\n")
    (src / "big").write_bytes(bytes(range(256)) * 5000)
    build([str(src)], tmp / "out", BuildOptions(workers=1))
    return tmp / "out", (tmp / "out" / "bootstrap").read_bytes()


def _pack(image: tuple[Path, bytes], **kw: Any) -> PackedImage:
    _out, data = image
    with Bootstrap.from_bytes(data) as boot:
        return pack_image(boot, data, **kw)


def _parse(raw: bytes) -> Manifest:
    return Manifest.parse(raw, MEDIA_OCI_MANIFEST, "sha256:" + hashlib.sha256(raw).hexdigest())


def _edit(packed: PackedImage, change: Any) -> Manifest:
    doc = json.loads(packed.manifest_bytes)
    change(doc)
    return _parse(json.dumps(doc).encode())


def test_round_trip(image: tuple[Path, bytes]) -> None:
    _out, data = image
    packed = _pack(image, source_config=SOURCE_CONFIG, source="r/src@sha256:" + "3" * 64)
    assert _pack(image, source_config=SOURCE_CONFIG,
                 source="r/src@sha256:" + "3" * 64) == packed  # deterministic
    manifest = _parse(packed.manifest_bytes)
    assert manifest.digest == packed.manifest_digest
    img = parse_image(manifest, "test")
    with Bootstrap.from_bytes(data) as boot:
        root = boot.header.root_digest.hex()
        blobs = [b.oci_digest for b in boot.blobs()]
    assert img.root_digest == root
    assert [d.digest for d in img.blobs] == blobs
    assert all(d.media_type == MEDIA_BLOB and d.annotations[ANN_BLOB_DIGEST] == d.digest
               for d in img.blobs)
    assert img.bootstrap.media_type == MEDIA_BOOTSTRAP_ZSTD
    assert img.bootstrap_digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert len(packed.bootstrap_layer) < len(data)  # compressed
    assert open_bootstrap_layer(img, packed.bootstrap_layer, "test") == data
    assert manifest.config.media_type == MEDIA_OCI_CONFIG
    assert manifest.config.digest == "sha256:" + hashlib.sha256(packed.config_bytes).hexdigest()


def test_config_keeps_runtime_config_and_matches_layers(image: tuple[Path, bytes]) -> None:
    packed = _pack(image, source_config=SOURCE_CONFIG)
    config = json.loads(packed.config_bytes)
    assert config["config"] == SOURCE_CONFIG["config"]
    assert (config["os"], config["architecture"], config["variant"]) == ("linux", "arm64", "v8")
    assert config["created"] == SOURCE_CONFIG["created"]
    assert "container_config" not in config and "docker_version" not in config
    ids = config["rootfs"]["diff_ids"]
    assert ids == [d.digest for d in packed.blobs] + [
        packed.bootstrap.annotations[ANN_BOOTSTRAP_DIGEST]]
    # Source history stays as empty layers; one entry of ours per layer.
    history = config["history"]
    assert [h["created_by"] for h in history[:2]] == ["RUN a", "RUN b"]
    assert all(h["empty_layer"] for h in history[:2])
    assert sum(not h.get("empty_layer") for h in history) == len(ids)


def test_minimal_config_for_a_local_build() -> None:
    config = build_config(None, ["sha256:" + "a" * 64], platform="linux/riscv64")
    assert config["os"] == "linux" and config["architecture"] == "riscv64"
    assert config["config"] == {}
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + "a" * 64]}
    assert len(config["history"]) == 1
    assert build_config(None, [])["architecture"]  # this host's platform
    with pytest.raises(ConfigError, match="invalid platform"):
        build_config(None, [], platform="linux")
    with pytest.raises(FormatError, match="'config' is not a JSON object"):
        build_config({"config": []}, [])


def _set_ann(key: str, value: str | None) -> Any:
    def change(doc: dict[str, Any]) -> None:
        ann = doc["layers"][-1]["annotations"]
        if value is None:
            del ann[key]
        else:
            ann[key] = value
    return change


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(layers=[{**x, "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}
                                for x in d["layers"]]),
     "not a nydusfs image .*layers: application/vnd.oci.image.layer.v1.tar\\+gzip"),
    (lambda d: d.update(layers=d["layers"][::-1]), "the last layer is .*blob"),
    (lambda d: d["layers"].insert(0, {"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                      "digest": "sha256:" + "0" * 64, "size": 1}),
     "layer 0 has media type .*tar"),
    (_set_ann(ANN_FORMAT_VERSION, "2"), "format version '2' is not supported"),
    (_set_ann(ANN_BOOTSTRAP, None), "lacks the annotation io.dfnydus.bootstrap"),
    (_set_ann(ANN_ROOT_DIGEST, "xyz"), "io.dfnydus.root.digest is missing or not 64"),
    (_set_ann(ANN_BOOTSTRAP_DIGEST, "md5:00"), "io.dfnydus.bootstrap.digest is missing"),
    (_set_ann(ANN_BOOTSTRAP_SIZE, str(1 << 40)), "io.dfnydus.bootstrap.size is missing or out"),
    (lambda d: d["annotations"].update({ANN_ROOT_DIGEST: "0" * 64}), "disagree on"),
    (lambda d: d["layers"][0]["annotations"].update({ANN_BLOB_DIGEST: "sha256:" + "0" * 64}),
     "does not match the layer digest"),
])
def test_malformed_manifests_are_refused(image: tuple[Path, bytes], change: Any,
                                         message: str) -> None:
    packed = _pack(image)
    with pytest.raises(FormatError, match=message):
        parse_image(_edit(packed, change), "reg/x:1")


def _image_with(packed: PackedImage, **bootstrap: Any) -> NydusImage:
    img = parse_image(_parse(packed.manifest_bytes), "t")
    return dataclasses.replace(img, **bootstrap)


def test_bootstrap_layer_checks(image: tuple[Path, bytes]) -> None:
    _out, data = image
    packed = _pack(image)
    img = _image_with(packed)
    layer = packed.bootstrap_layer
    with pytest.raises(IntegrityError, match="bootstrap layer does not match"):
        open_bootstrap_layer(img, layer[:-1] + bytes([layer[-1] ^ 1]), "t")
    # A layer that matches its descriptor but unpacks to other bytes than annotated.
    other = zstandard.ZstdCompressor().compress(data[:-1] + bytes([data[-1] ^ 1]))
    forged = dataclasses.replace(img.bootstrap, digest="sha256:" + hashlib.sha256(other)
                                 .hexdigest(), size=len(other))
    with pytest.raises(IntegrityError, match="unpacked bootstrap does not match"):
        open_bootstrap_layer(dataclasses.replace(img, bootstrap=forged), other, "t")
    # More output than the annotation allows is cut off, never allocated.
    with pytest.raises((FormatError, IntegrityError)):
        open_bootstrap_layer(_image_with(packed, bootstrap_size=100), layer, "t")
    # The root digest and the blob table must agree with the manifest.
    with pytest.raises(IntegrityError, match="root digest"):
        open_bootstrap_layer(_image_with(packed, root_digest="0" * 64), layer, "t")
    with pytest.raises(IntegrityError, match="not a layer of the image"):
        open_bootstrap_layer(_image_with(packed, blobs=()), layer, "t")


def test_uncompressed_bootstrap_layer_is_accepted(image: tuple[Path, bytes]) -> None:
    _out, data = image
    packed = _pack(image)

    def plain(doc: dict[str, Any]) -> None:
        last = doc["layers"][-1]
        last.update(mediaType=MEDIA_BOOTSTRAP, size=len(data),
                    digest="sha256:" + hashlib.sha256(data).hexdigest())
        for key in (ANN_BOOTSTRAP_DIGEST, ANN_BOOTSTRAP_SIZE):
            del last["annotations"][key]

    img = parse_image(_edit(packed, plain), "t")
    assert img.bootstrap_digest is None
    assert open_bootstrap_layer(img, data, "t") == data


def test_descriptor_annotations_are_strings(image: tuple[Path, bytes]) -> None:
    packed = _pack(image)
    for d in (*packed.blobs, packed.bootstrap):
        assert isinstance(d, Descriptor)
        assert all(isinstance(v, str) for v in d.annotations.values())
