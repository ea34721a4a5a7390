"""OCI image layout source (``oci:PATH[:TAG]``, as umoci and skopeo write it).

Resolves a tag through ``index.json`` (descending into an image index for the platform), reads
the manifest and yields its layers, lowest first, as streams that verify their sha256 digest as
they are read: a layout is untrusted input, and a layer whose bytes do not match the manifest is
rejected before the build finishes. Docker media types are accepted alongside OCI ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from nydusfs.errors import IntegrityError, SourceError

__all__ = ["OciImage", "VerifyingReader", "open_oci_layout", "parse_oci_ref"]

MT_INDEX = {"application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json"}
MT_MANIFEST = {"application/vnd.oci.image.manifest.v1+json",
               "application/vnd.docker.distribution.manifest.v2+json"}
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
}
REF_NAME = "org.opencontainers.image.ref.name"
_MAX_JSON = 4 * 1024 * 1024


def parse_oci_ref(src: str) -> tuple[Path, str | None] | None:
    """``oci:PATH[:TAG]`` → (path, tag); None if ``src`` is not an ``oci:`` reference."""
    if not src.startswith("oci:"):
        return None
    rest = src[4:]
    path, sep, tag = rest.rpartition(":")
    if sep and "/" not in tag and os.path.isdir(path):
        return Path(path), tag or None
    return Path(rest), None


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    @classmethod
    def parse(cls, d: Any, what: str) -> Descriptor:
        if not isinstance(d, dict):
            raise SourceError(f"{what}: descriptor is not an object")
        mt, dg, size = d.get("mediaType"), d.get("digest"), d.get("size")
        if not isinstance(mt, str) or not isinstance(dg, str) or not isinstance(size, int):
            raise SourceError(f"{what}: descriptor lacks mediaType/digest/size")
        algo, _, hexd = dg.partition(":")
        if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
            raise SourceError(f"{what}: unsupported digest {dg!r}")
        if size < 0:
            raise SourceError(f"{what}: negative size")
        return cls(mt, dg, size)


class VerifyingReader:
    """Reads a blob and raises ``IntegrityError`` at EOF if its sha256 or size is wrong."""

    def __init__(self, f: BinaryIO, desc: Descriptor, label: str) -> None:
        self._f = f
        self._desc = desc
        self._label = label
        self._sha = hashlib.sha256()
        self._n = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._sha.update(data)
        self._n += len(data)
        if self._n > self._desc.size:
            raise IntegrityError(f"{self._label}: larger than its descriptor says")
        if not data and n != 0:
            self.verify()
        return data

    def finish(self) -> None:
        """Read what the consumer left (tar padding) and verify."""
        while self.read(1 << 20):
            pass
        self.verify()

    def verify(self) -> None:
        if self._n != self._desc.size or "sha256:" + self._sha.hexdigest() != self._desc.digest:
            raise IntegrityError(f"{self._label}: content does not match {self._desc.digest}")


@dataclass(slots=True)
class OciImage:
    path: Path
    manifest_digest: str
    layers: list[Descriptor]
    config: dict[str, Any]

    def blob_path(self, desc: Descriptor) -> Path:
        return self.path / "blobs" / "sha256" / desc.digest.split(":", 1)[1]

    @contextmanager
    def open_layer(self, desc: Descriptor) -> Iterator[VerifyingReader]:
        label = f"layer {desc.digest[:19]}"
        try:
            f = open(self.blob_path(desc), "rb")  # noqa: SIM115
        except OSError as exc:
            raise SourceError(f"{label}: missing from the layout: {exc.strerror}") from exc
        with f:
            reader = VerifyingReader(f, desc, label)
            try:
                yield reader
            except SourceError as exc:
                # An unparsable layer may simply be corrupt: if its digest is wrong, say that.
                try:
                    reader.finish()
                except IntegrityError as bad:
                    raise bad from exc
                raise
            reader.finish()


def _read_json(path: Path, what: str, desc: Descriptor | None = None) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_JSON + 1)
    except OSError as exc:
        raise SourceError(f"{what}: cannot read {path}: {exc.strerror}") from exc
    if len(data) > _MAX_JSON:
        raise SourceError(f"{what}: {path} is too large")
    if desc is not None and (
        len(data) != desc.size or "sha256:" + hashlib.sha256(data).hexdigest() != desc.digest
    ):
        raise IntegrityError(f"{what}: {path} does not match digest {desc.digest}")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise SourceError(f"{what}: {path} is not valid JSON: {exc}") from exc


def open_oci_layout(path: Path, tag: str | None, platform: str = "linux/amd64") -> OciImage:
    """Resolve ``tag`` in the layout at ``path`` to a manifest and its layers."""
    layout = _read_json(path / "oci-layout", "OCI layout")
    if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
        raise SourceError(f"{path}: not an OCI image layout (oci-layout file)")
    index = _read_json(path / "index.json", "OCI layout")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise SourceError(f"{path}: index.json lists no images")
    tags = [_ref_name(m) for m in manifests]
    if tag is None:
        if len(manifests) != 1:
            raise SourceError(f"{path}: several images, name one with oci:PATH:TAG (tags: {tags})")
        chosen = manifests[0]
    else:
        found = [m for m in manifests if _ref_name(m) == tag]
        if not found:
            raise SourceError(f"{path}: no image tagged {tag!r} (tags: {tags})")
        chosen = found[0]
    desc = Descriptor.parse(chosen, "index.json")
    blobs = path / "blobs" / "sha256"
    for _ in range(4):  # index → (index →) manifest; bounded against loops
        if desc.media_type not in MT_INDEX:
            break
        sub = _read_json(blobs / desc.digest[7:], "image index", desc)
        desc = _pick_platform(sub, platform, path)
    if desc.media_type not in MT_MANIFEST:
        raise SourceError(f"{path}: {desc.digest} is {desc.media_type!r}, not an image manifest")
    manifest = _read_json(blobs / desc.digest[7:], "manifest", desc)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
        raise SourceError(f"{path}: manifest {desc.digest} has no layers list")
    layers = [Descriptor.parse(d, f"manifest layer {i}") for i, d in enumerate(manifest["layers"])]
    for i, layer in enumerate(layers):
        if layer.media_type not in LAYER_TYPES:
            raise SourceError(f"{path}: layer {i} has unsupported media type {layer.media_type!r}")
    config: dict[str, Any] = {}
    if "config" in manifest:
        cdesc = Descriptor.parse(manifest["config"], "manifest config")
        loaded = _read_json(blobs / cdesc.digest[7:], "image config", cdesc)
        config = loaded if isinstance(loaded, dict) else {}
    return OciImage(path, desc.digest, layers, config)


def _ref_name(descriptor: Any) -> str | None:
    annotations = descriptor.get("annotations") if isinstance(descriptor, dict) else None
    name = annotations.get(REF_NAME) if isinstance(annotations, dict) else None
    return name if isinstance(name, str) else None


def _pick_platform(index: Any, platform: str, path: Path) -> Descriptor:
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise SourceError(f"{path}: image index lists no manifests")
    os_name, _, arch = platform.partition("/")
    for m in manifests:
        p = m.get("platform") if isinstance(m, dict) else None
        if isinstance(p, dict) and p.get("os") == os_name and p.get("architecture") == arch:
            return Descriptor.parse(m, "image index")
    if len(manifests) == 1:
        return Descriptor.parse(manifests[0], "image index")
    raise SourceError(f"{path}: no manifest for platform {platform}")
