"""How a nydusfs image is packaged as an ordinary OCI image, and how one is recognised.

A nydusfs image in a registry is a plain OCI image manifest (docs/oci.md has the full picture
and an example)::

    manifest  application/vnd.oci.image.manifest.v1+json, annotations io.dfnydus.*
      config  application/vnd.oci.image.config.v1+json  (the source image's runtime config)
      layers  application/vnd.dfnydus.blob.v1            one per blob of the bootstrap's blob
              ...                                        table, in blob-table order
              application/vnd.dfnydus.bootstrap.v1+zstd  the bootstrap, zstd-compressed, LAST

Our bytes are not RAFS, so the media types and annotation keys are our own
(``application/vnd.dfnydus.*``, ``io.dfnydus.*``), never Nydus's. Blob layers are stored as they
are (a blob is already named by the sha256 of its bytes, as a layer is), so their descriptor
digest *is* the blob name the bootstrap records; the bootstrap layer is compressed (it is read
whole before a mount can start, over what may be a slow link) and its uncompressed sha256 is
recorded in an annotation and in the config's ``rootfs.diff_ids``, as OCI does for ``+gzip``
layers.

What a runtime that does not know the format sees: a valid image whose config carries the
source's Entrypoint/Cmd/Env/... and whose ``rootfs.diff_ids`` are consistent with the layers
(for a blob: its digest, since it is stored uncompressed; for the bootstrap: the digest of its
decompressed bytes). Registries, ``skopeo copy`` and other distribution tools handle it like
any image. A runtime asked to unpack it finds layers of an unknown media type and refuses
(containerd: "unsupported media type"), instead of unpacking something meaningless.

This module is JSON and bytes in and out; its one network function, :func:`fetch_image`,
only drives a client it is given (``nydusfs/push.py`` and ``nydusfs/convert.py`` do the
transfers). Manifests from a registry are untrusted input:
:func:`parse_image` validates them and raises ``FormatError`` naming what is wrong (not an
image, not a nydusfs image, an unsupported format version, a malformed annotation);
:func:`open_bootstrap_layer` checks the bootstrap layer against its digests and the manifest's
annotations (``IntegrityError`` on a mismatch).
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zstandard

from nydusfs.errors import FormatError, IntegrityError
from nydusfs.format import layout as L
from nydusfs.format.reader import Bootstrap
from nydusfs.oci.manifest import (
    MEDIA_DOCKER_CONFIG,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_MANIFEST,
    Descriptor,
    Manifest,
    Platform,
)

if TYPE_CHECKING:
    from nydusfs.oci.client import RegistryClient
    from nydusfs.oci.reference import Reference

__all__ = [
    "ANN_BLOB_DIGEST",
    "ANN_BOOTSTRAP",
    "ANN_BOOTSTRAP_DIGEST",
    "ANN_BOOTSTRAP_SIZE",
    "ANN_CHUNKER",
    "ANN_CHUNK_SIZE",
    "ANN_FORMAT_VERSION",
    "ANN_ROOT_DIGEST",
    "ANN_SOURCE",
    "FORMAT_VERSION",
    "MAX_BOOTSTRAP_SIZE",
    "MEDIA_BLOB",
    "MEDIA_BOOTSTRAP",
    "MEDIA_BOOTSTRAP_ZSTD",
    "NydusImage",
    "PackedImage",
    "build_config",
    "check_bootstrap",
    "fetch_image",
    "host_platform",
    "open_bootstrap_layer",
    "pack_image",
    "parse_image",
    "parse_platform",
]

# -- media types ------------------------------------------------------------------------------
MEDIA_BLOB = "application/vnd.dfnydus.blob.v1"
MEDIA_BOOTSTRAP = "application/vnd.dfnydus.bootstrap.v1"  # uncompressed (accepted on read)
MEDIA_BOOTSTRAP_ZSTD = "application/vnd.dfnydus.bootstrap.v1+zstd"  # what we write
_BOOTSTRAP_TYPES = (MEDIA_BOOTSTRAP, MEDIA_BOOTSTRAP_ZSTD)

# -- annotation keys --------------------------------------------------------------------------
ANN_FORMAT_VERSION = "io.dfnydus.format.version"  # manifest + every layer: "1"
ANN_ROOT_DIGEST = "io.dfnydus.root.digest"  # manifest + bootstrap layer: Merkle root, 64 hex
ANN_CHUNK_SIZE = "io.dfnydus.chunk.size"  # manifest: bytes, decimal
ANN_CHUNKER = "io.dfnydus.chunker"  # manifest: "fixed" | "cdc"
ANN_SOURCE = "io.dfnydus.source"  # manifest (convert): the source image, REPO@DIGEST
ANN_BOOTSTRAP = "io.dfnydus.bootstrap"  # bootstrap layer: "true"
ANN_BOOTSTRAP_DIGEST = "io.dfnydus.bootstrap.digest"  # bootstrap layer: sha256 of it, unpacked
ANN_BOOTSTRAP_SIZE = "io.dfnydus.bootstrap.size"  # bootstrap layer: bytes, unpacked
ANN_BLOB_DIGEST = "io.dfnydus.blob.digest"  # blob layer: "sha256:..." (= the layer digest)

FORMAT_VERSION = str(L.VERSION)
SUPPORTED_VERSIONS = frozenset({FORMAT_VERSION})
MAX_BOOTSTRAP_SIZE = 1 << 30  # unpacked; bounds decompression of an untrusted layer
BOOTSTRAP_ZSTD_LEVEL = 9  # bootstraps are small and compress ~4x; fixed for reproducibility

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")

# Image-config keys kept from the source image. ``config`` holds what a runtime needs to run
# it (Entrypoint, Cmd, Env, WorkingDir, User, ExposedPorts, Volumes, Labels, StopSignal, ...)
# and is kept whole; rootfs and history are rewritten for our layers; Docker's legacy
# container/container_config/docker_version are dropped.
_KEPT_CONFIG_KEYS = ("created", "author", "architecture", "os", "os.version", "os.features",
                     "variant", "config")

_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
           "armv7l": "arm", "armv6l": "arm", "i386": "386", "i686": "386",
           "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def host_platform() -> str:
    """This machine's platform as OCI names it (``linux/amd64``, ``linux/arm64``, ...)."""
    machine = _platform.machine().lower()
    arch = _GOARCH.get(machine, machine or "amd64")
    if machine == "armv7l":
        return "linux/arm/v7"
    return f"linux/{arch}"


def parse_platform(text: str) -> dict[str, str]:
    """``os/arch[/variant]`` → the config's ``os``/``architecture``/``variant`` fields."""
    p = Platform.parse(text)
    out = {"os": p.os, "architecture": p.architecture}
    if p.variant is not None:
        out["variant"] = p.variant
    return out


# -- writing ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PackedImage:
    """Everything to push for one image: blob layers (by name), bootstrap, config, manifest.

    ``blobs`` are the descriptors of the blob layers in blob-table order (their bytes are the
    files ``blobs/<hex>``, wherever the caller has them); ``bootstrap_layer`` is the compressed
    bootstrap to upload as the last layer.
    """

    blobs: tuple[Descriptor, ...]
    bootstrap: Descriptor
    bootstrap_layer: bytes
    config: Descriptor
    config_bytes: bytes
    manifest_bytes: bytes
    media_type: str = MEDIA_OCI_MANIFEST

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest_bytes).hexdigest()


def _descriptor(media_type: str, data: bytes, annotations: Mapping[str, str] | None = None
                ) -> Descriptor:
    return Descriptor(media_type=media_type,
                      digest="sha256:" + hashlib.sha256(data).hexdigest(),
                      size=len(data), annotations=dict(annotations or {}))


def build_config(source_config: Mapping[str, Any] | None, diff_ids: Sequence[str], *,
                 platform: str | None = None, history: str = "nydusfs") -> dict[str, Any]:
    """The image config of a nydusfs image: the source's runtime config, our rootfs.

    ``source_config`` is the source image's config JSON (``None`` for a locally built image:
    a minimal valid config, empty runtime config, ``platform`` or this host's). The source's
    history is kept with every entry marked ``empty_layer`` (it describes layers that are now
    flattened), followed by one entry per layer of ours, so history and ``rootfs.diff_ids``
    stay consistent.
    """
    cfg: dict[str, Any] = {}
    if source_config is not None:
        if not isinstance(source_config, Mapping):
            raise FormatError("source image config: not a JSON object")
        runtime = source_config.get("config")
        if runtime is not None and not isinstance(runtime, Mapping):
            raise FormatError("source image config: 'config' is not a JSON object")
        for key in _KEPT_CONFIG_KEYS:
            if source_config.get(key) is not None:
                cfg[key] = source_config[key]
    if platform is not None:
        cfg.update(parse_platform(platform))
    elif "architecture" not in cfg or "os" not in cfg:
        cfg.update(parse_platform(host_platform()))
    cfg.setdefault("config", {})
    cfg["rootfs"] = {"type": "layers", "diff_ids": list(diff_ids)}
    old = source_config.get("history") if source_config is not None else None
    entries: list[dict[str, Any]] = []
    if isinstance(old, list):
        for h in old:
            if isinstance(h, Mapping):
                entries.append({**h, "empty_layer": True})
    n = len(diff_ids)
    for i in range(n):
        what = "bootstrap" if i == n - 1 else f"blob {i}"
        entries.append({"created_by": f"{history}: {what}",
                        "comment": "dfnydus lazy image layer (docs/oci.md)"})
    cfg["history"] = entries
    return cfg


def pack_image(boot: Bootstrap, bootstrap_bytes: bytes, *,
               source_config: Mapping[str, Any] | None = None,
               platform: str | None = None,
               source: str | None = None,
               history: str = "nydusfs") -> PackedImage:
    """Describe ``boot`` (whose file content is ``bootstrap_bytes``) as an OCI image.

    Deterministic: the same bootstrap and source config give the same manifest digest.
    """
    h = boot.header
    root = h.root_digest.hex()
    version = str(h.version)
    blobs = tuple(
        Descriptor(media_type=MEDIA_BLOB, digest=b.oci_digest, size=b.size,
                   annotations={ANN_FORMAT_VERSION: version, ANN_BLOB_DIGEST: b.oci_digest})
        for b in boot.blobs()
    )
    cctx = zstandard.ZstdCompressor(level=BOOTSTRAP_ZSTD_LEVEL, write_content_size=True)
    layer = cctx.compress(bootstrap_bytes)
    boot_sha = "sha256:" + hashlib.sha256(bootstrap_bytes).hexdigest()
    bootstrap = _descriptor(MEDIA_BOOTSTRAP_ZSTD, layer, {
        ANN_BOOTSTRAP: "true",
        ANN_FORMAT_VERSION: version,
        ANN_ROOT_DIGEST: root,
        ANN_BOOTSTRAP_DIGEST: boot_sha,
        ANN_BOOTSTRAP_SIZE: str(len(bootstrap_bytes)),
    })
    diff_ids = [b.digest for b in blobs] + [boot_sha]
    config = build_config(source_config, diff_ids, platform=platform, history=history)
    config_bytes = _json(config)
    config_desc = _descriptor(MEDIA_OCI_CONFIG, config_bytes)
    annotations = {
        ANN_FORMAT_VERSION: version,
        ANN_ROOT_DIGEST: root,
        ANN_CHUNK_SIZE: str(h.chunk_size),
        ANN_CHUNKER: "cdc" if h.cdc else "fixed",
    }
    if source is not None:
        annotations[ANN_SOURCE] = source
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [d.to_json() for d in (*blobs, bootstrap)],
        "annotations": annotations,
    }
    return PackedImage(blobs=blobs, bootstrap=bootstrap, bootstrap_layer=layer,
                       config=config_desc, config_bytes=config_bytes,
                       manifest_bytes=_json(manifest))


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


# -- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NydusImage:
    """A manifest recognised as a nydusfs image (validated by :func:`parse_image`)."""

    manifest: Manifest
    bootstrap: Descriptor  # the last layer
    blobs: tuple[Descriptor, ...]  # the blob layers, in manifest order
    format_version: str
    root_digest: str  # 64 hex
    bootstrap_digest: str | None  # sha256 of the unpacked bootstrap (None: layer is unpacked)
    bootstrap_size: int | None
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def blob_digests(self) -> frozenset[str]:
        return frozenset(b.digest for b in self.blobs)

    def summary(self) -> dict[str, Any]:
        """For ``inspect``: the manifest's view of the image."""
        return {
            "manifest_digest": self.manifest.digest,
            "format_version": self.format_version,
            "root_digest": self.root_digest,
            "bootstrap": {"digest": self.bootstrap.digest, "size": self.bootstrap.size,
                          "media_type": self.bootstrap.media_type,
                          "unpacked_digest": self.bootstrap_digest,
                          "unpacked_size": self.bootstrap_size},
            "blob_layers": [{"digest": b.digest, "size": b.size} for b in self.blobs],
            "annotations": dict(self.annotations),
        }


def parse_image(manifest: Manifest, where: str) -> NydusImage:
    """Recognise ``manifest`` as a nydusfs image; ``FormatError`` naming ``where`` otherwise."""
    layers = manifest.layers
    ours = [d for d in layers if d.media_type in _BOOTSTRAP_TYPES or d.media_type == MEDIA_BLOB]
    if not ours:
        kinds = sorted({d.media_type for d in layers}) or ["no layers"]
        raise FormatError(f"{where}: not a nydusfs image (no {MEDIA_BOOTSTRAP_ZSTD} layer; "
                          f"layers: {', '.join(kinds)}); convert it with `nydusfs convert`")
    if manifest.config.media_type not in (MEDIA_OCI_CONFIG, MEDIA_DOCKER_CONFIG):
        raise FormatError(f"{where}: config has media type {manifest.config.media_type!r}, "
                          "not an image config")
    last = layers[-1]
    if last.media_type not in _BOOTSTRAP_TYPES:
        raise FormatError(f"{where}: the last layer is {last.media_type!r}; a nydusfs image "
                          "has its bootstrap last")
    blobs = layers[:-1]
    for i, d in enumerate(blobs):
        if d.media_type != MEDIA_BLOB:
            raise FormatError(f"{where}: layer {i} has media type {d.media_type!r}; a nydusfs "
                              f"image has only {MEDIA_BLOB} layers before its bootstrap")
        blob_ann = d.annotations.get(ANN_BLOB_DIGEST)
        if blob_ann is not None and blob_ann != d.digest:
            raise FormatError(f"{where}: layer {i}: {ANN_BLOB_DIGEST} {blob_ann!r} does not "
                              f"match the layer digest {d.digest}")
    ann = last.annotations
    if ann.get(ANN_BOOTSTRAP) != "true":
        raise FormatError(f"{where}: the bootstrap layer lacks the annotation "
                          f"{ANN_BOOTSTRAP}: \"true\"")
    version = ann.get(ANN_FORMAT_VERSION, manifest.annotations.get(ANN_FORMAT_VERSION))
    if version is None:
        raise FormatError(f"{where}: the bootstrap layer lacks {ANN_FORMAT_VERSION}")
    if version not in SUPPORTED_VERSIONS:
        raise FormatError(f"{where}: nydusfs format version {version!r} is not supported "
                          f"(this nydusfs reads {', '.join(sorted(SUPPORTED_VERSIONS))})")
    root = ann.get(ANN_ROOT_DIGEST)
    if root is None or not _HEX64.fullmatch(root):
        raise FormatError(f"{where}: bootstrap layer annotation {ANN_ROOT_DIGEST} is missing "
                          "or not 64 lowercase hex digits")
    manifest_root = manifest.annotations.get(ANN_ROOT_DIGEST)
    if manifest_root is not None and manifest_root != root:
        raise FormatError(f"{where}: manifest and bootstrap layer disagree on "
                          f"{ANN_ROOT_DIGEST}")
    boot_digest = ann.get(ANN_BOOTSTRAP_DIGEST)
    boot_size: int | None = None
    if last.media_type == MEDIA_BOOTSTRAP_ZSTD:
        if boot_digest is None or not _SHA256.fullmatch(boot_digest):
            raise FormatError(f"{where}: bootstrap layer annotation {ANN_BOOTSTRAP_DIGEST} is "
                              "missing or not sha256:<64 hex>")
        raw_size = ann.get(ANN_BOOTSTRAP_SIZE, "")
        if not raw_size.isdigit() or not 0 < int(raw_size) <= MAX_BOOTSTRAP_SIZE:
            raise FormatError(f"{where}: bootstrap layer annotation {ANN_BOOTSTRAP_SIZE} is "
                              f"missing or out of range (at most {MAX_BOOTSTRAP_SIZE})")
        boot_size = int(raw_size)
    else:
        if last.size > MAX_BOOTSTRAP_SIZE:
            raise FormatError(f"{where}: bootstrap layer of {last.size} bytes is too large")
        boot_digest = None
    return NydusImage(manifest=manifest, bootstrap=last, blobs=tuple(blobs),
                      format_version=version, root_digest=root, bootstrap_digest=boot_digest,
                      bootstrap_size=boot_size, annotations=dict(manifest.annotations))


def open_bootstrap_layer(image: NydusImage, layer: bytes, where: str) -> bytes:
    """The bootstrap's bytes from its layer's bytes, every digest and annotation checked.

    Raises ``IntegrityError`` when the layer does not match its descriptor, the unpacked bytes
    do not match ``io.dfnydus.bootstrap.digest``, or the bootstrap's root digest or blob table
    disagree with the manifest; ``FormatError`` when it does not decompress or parse.
    """
    desc = image.bootstrap
    if len(layer) != desc.size or "sha256:" + hashlib.sha256(layer).hexdigest() != desc.digest:
        raise IntegrityError(f"{where}: bootstrap layer does not match {desc.digest}")
    if desc.media_type == MEDIA_BOOTSTRAP_ZSTD:
        assert image.bootstrap_size is not None and image.bootstrap_digest is not None
        try:
            data = zstandard.ZstdDecompressor().decompress(
                layer, max_output_size=image.bootstrap_size)
        except zstandard.ZstdError as exc:
            raise FormatError(f"{where}: bootstrap layer does not decompress: {exc}") from exc
        if (len(data) != image.bootstrap_size
                or "sha256:" + hashlib.sha256(data).hexdigest() != image.bootstrap_digest):
            raise IntegrityError(f"{where}: unpacked bootstrap does not match "
                                 f"{image.bootstrap_digest}")
    else:
        data = layer
    boot = Bootstrap.from_bytes(data, name=f"{where} bootstrap")
    check_bootstrap(image, boot, where)
    return data


def check_bootstrap(image: NydusImage, boot: Bootstrap, where: str) -> None:
    """The bootstrap agrees with the manifest: root digest, and every blob is a layer."""
    if boot.header.root_digest.hex() != image.root_digest:
        raise IntegrityError(f"{where}: bootstrap root digest {boot.header.root_digest.hex()} "
                             f"does not match the manifest's {image.root_digest}")
    layers = image.blob_digests
    for b in boot.blobs():
        if b.oci_digest not in layers:
            raise IntegrityError(f"{where}: bootstrap references blob {b.oci_digest}, which "
                                 "is not a layer of the image")


async def fetch_image(client: RegistryClient, ref: Reference, *,
                      platform: str = "linux/amd64") -> tuple[NydusImage, bytes]:
    """Fetch ``ref``'s manifest and bootstrap, and check both (:func:`open_bootstrap_layer`).

    Returns the recognised image and the bootstrap's (unpacked) bytes.
    """
    manifest = await client.get_manifest(ref.repository, ref.reference, platform=platform)
    image = parse_image(manifest, str(ref))
    layer = await client.get_blob(ref.repository, image.bootstrap.digest,
                                  max_size=max(image.bootstrap.size, 1))
    return image, open_bootstrap_layer(image, layer, str(ref))
