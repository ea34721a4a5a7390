"""Manifests, indexes and descriptors parsed from untrusted JSON: valid ones, and clear errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nydusfs.errors import ConfigError, FormatError, IntegrityError, NotFoundError
from nydusfs.oci.manifest import (
    MAX_MANIFEST_SIZE,
    MEDIA_DOCKER_CONFIG,
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    compute_digest,
    parse_manifest_or_index,
)

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def desc(n: int, media_type: str = LAYER, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": "sha256:" + f"{n:02x}" * 32, "size": 100 + n,
            **extra}


def manifest_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST,
                           "config": desc(0, MEDIA_OCI_CONFIG),
                           "layers": [desc(1), desc(2)],
                           "annotations": {"org.example": "x"}}
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not None}


def raw(doc: object) -> bytes:
    return json.dumps(doc).encode()


def parse(doc: object, media_type: str = MEDIA_OCI_MANIFEST) -> Manifest:
    data = raw(doc)
    return Manifest.parse(data, media_type, compute_digest(data))


def test_oci_manifest() -> None:
    data = raw(manifest_doc())
    m = Manifest.parse(data, MEDIA_OCI_MANIFEST, compute_digest(data))
    assert m.media_type == MEDIA_OCI_MANIFEST and m.raw == data
    assert m.config == Descriptor(MEDIA_OCI_CONFIG, "sha256:" + "00" * 32, 100)
    assert [layer.size for layer in m.layers] == [101, 102]
    assert m.annotations == {"org.example": "x"}
    assert m.descriptor() == Descriptor(MEDIA_OCI_MANIFEST, m.digest, len(data))


def test_docker_v2_manifest_with_media_type_only_in_header() -> None:
    doc = manifest_doc(mediaType=None, config=desc(0, MEDIA_DOCKER_CONFIG),
                       layers=[desc(1, "application/vnd.docker.image.rootfs.diff.tar.gzip")],
                       annotations=None)
    m = parse(doc, MEDIA_DOCKER_MANIFEST)
    assert m.media_type == MEDIA_DOCKER_MANIFEST and m.annotations == {}


def test_descriptor_round_trip() -> None:
    d = Descriptor(LAYER, "sha256:" + "11" * 32, 5, {"a": "b"},
                   {"os": "linux", "architecture": "arm64", "variant": "v8"})
    assert Descriptor.from_json(d.to_json(), "x") == d
    assert Descriptor(LAYER, "sha256:" + "11" * 32, 5).to_json() == {
        "mediaType": LAYER, "digest": "sha256:" + "11" * 32, "size": 5}


@pytest.mark.parametrize("doc, message", [
    (manifest_doc(schemaVersion=1), "schema 1"),
    (manifest_doc(schemaVersion="2"), "schemaVersion"),
    (manifest_doc(mediaType="application/vnd.oci.image.index.v1+json"), "is an image index"),
    (manifest_doc(mediaType="text/html"), "not an image manifest"),
    (manifest_doc(config=desc(0, "application/vnd.cncf.helm.config.v1+json")),
     "not a container image"),
    (manifest_doc(config=None), "config: expected a descriptor"),
    (manifest_doc(layers={"a": 1}), "layers: expected a list"),
    (manifest_doc(layers=[desc(1, size=-1)]), "layers[0].size"),
    (manifest_doc(layers=[desc(1, size=True)]), "layers[0].size"),
    (manifest_doc(layers=[desc(1, size=1.5)]), "layers[0].size"),
    (manifest_doc(layers=[desc(1, digest="sha256:xyz")]), "layers[0].digest: invalid digest"),
    (manifest_doc(layers=[desc(1, digest="md5:" + "a" * 32)]), "unsupported digest algorithm"),
    (manifest_doc(layers=[desc(1, mediaType=5)]), "layers[0].mediaType"),
    (manifest_doc(layers=[desc(1, annotations={"a": 1})]), "layers[0].annotations.a"),
    (manifest_doc(annotations=[1]), "annotations: expected an object"),
    ([1, 2], "expected a JSON object"),
])
def test_invalid_manifests(doc: object, message: str) -> None:
    with pytest.raises(FormatError) as info:
        parse(doc)
    assert message in str(info.value)
    assert not isinstance(info.value, IntegrityError)


def test_not_json_and_too_big() -> None:
    with pytest.raises(FormatError, match="not valid JSON"):
        Manifest.parse(b"{nope", MEDIA_OCI_MANIFEST, compute_digest(b"{nope"))
    big = b" " * MAX_MANIFEST_SIZE + b"{}"
    with pytest.raises(FormatError, match="more than the 4194304 allowed"):
        Manifest.parse(big, MEDIA_OCI_MANIFEST, compute_digest(big))


def test_digest_must_match_the_bytes() -> None:
    data = raw(manifest_doc())
    with pytest.raises(IntegrityError, match="hashes to"):
        Manifest.parse(data, MEDIA_OCI_MANIFEST, "sha256:" + "0" * 64)


def index_doc(*entries: dict[str, Any], media_type: str = MEDIA_OCI_INDEX) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": media_type, "manifests": list(entries)}


def plat(n: int, os: str, arch: str, variant: str | None = None,
         media_type: str = MEDIA_OCI_MANIFEST) -> dict[str, Any]:
    p = {"os": os, "architecture": arch}
    if variant:
        p["variant"] = variant
    return desc(n, media_type, platform=p)


def parse_index(doc: object, media_type: str = MEDIA_OCI_INDEX) -> Index:
    data = raw(doc)
    return Index.parse(data, media_type, compute_digest(data))


def test_index_select() -> None:
    index = parse_index(index_doc(
        plat(9, "unknown", "unknown"),  # an attestation entry, as buildkit writes
        plat(1, "linux", "arm", "v6"),
        plat(2, "linux", "arm", "v7"),
        plat(3, "linux", "arm64"),
        plat(4, "linux", "amd64"),
        plat(5, "windows", "amd64"),
    ))
    digest = {n: "sha256:" + f"{n:02x}" * 32 for n in range(10)}
    assert index.select("linux/amd64").digest == digest[4]
    assert index.select("windows/amd64").digest == digest[5]
    assert index.select("linux/arm64").digest == digest[3]
    assert index.select("linux/arm64/v8").digest == digest[3]  # default variant of arm64
    assert index.select("linux/arm/v7").digest == digest[2]
    assert index.select("linux/arm").digest == digest[1]  # first os/arch match
    assert index.select("LINUX/AMD64").digest == digest[4]
    with pytest.raises(NotFoundError, match=r"no image for platform linux/s390x \(available: "
                                            r"unknown/unknown, linux/arm/v6"):
        index.select("linux/s390x")
    with pytest.raises(ConfigError, match="invalid platform"):
        index.select("amd64")


def test_docker_manifest_list_and_skipped_nested_index() -> None:
    index = parse_index(index_doc(plat(1, "linux", "amd64", media_type=MEDIA_OCI_INDEX),
                                  plat(2, "linux", "amd64", media_type=MEDIA_DOCKER_MANIFEST),
                                  media_type=MEDIA_DOCKER_LIST), MEDIA_DOCKER_LIST)
    assert index.media_type == MEDIA_DOCKER_LIST
    assert index.select("linux/amd64").digest == "sha256:" + "02" * 32


@pytest.mark.parametrize("doc, message", [
    (index_doc(plat(1, "linux", "amd64"), media_type=MEDIA_OCI_MANIFEST), "not an index"),
    ({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": "x"},
     "manifests: expected a list"),
    (index_doc(desc(1, MEDIA_OCI_MANIFEST, platform={"os": "linux"})),
     "manifests[0].platform.architecture: required"),
    (index_doc(desc(1, MEDIA_OCI_MANIFEST, platform={"os": "linux", "architecture": 3})),
     "platform.architecture: expected a string"),
    (index_doc(desc(1, MEDIA_OCI_MANIFEST, platform="linux/amd64")),
     "platform: expected an object"),
])
def test_invalid_indexes(doc: object, message: str) -> None:
    with pytest.raises(FormatError) as info:
        parse_index(doc)
    assert message in str(info.value)


def test_parse_manifest_or_index_tells_them_apart_by_shape() -> None:
    m = manifest_doc(mediaType=None)
    i = {"schemaVersion": 2, "manifests": [plat(1, "linux", "amd64")]}
    for doc, kind in ((m, Manifest), (i, Index)):
        data = raw(doc)
        assert isinstance(parse_manifest_or_index(data, "application/json",
                                                  compute_digest(data)), kind)
