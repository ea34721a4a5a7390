"""Manifests, indexes and descriptors: value types parsed from untrusted registry JSON.

Everything a registry returns is validated here, where it enters, before any field is used
(sizes are non-negative integers, digests are well formed, media types are strings, ...);
a violation is a :class:`~nydusfs.errors.FormatError` that says where (``manifest
sha256:ab..: layers[2].size: expected a non-negative integer``). ``parse`` also checks that
the bytes hash to the digest they were fetched under (:class:`~nydusfs.errors.IntegrityError`
otherwise), so a :class:`Manifest` always holds exactly the bytes its digest names.

Two families are understood, as every registry serves them:

============================  ==============================================================
OCI image manifest            ``application/vnd.oci.image.manifest.v1+json``
OCI image index               ``application/vnd.oci.image.index.v1+json``
Docker v2 schema 2 manifest   ``application/vnd.docker.distribution.manifest.v2+json``
Docker manifest list          ``application/vnd.docker.distribution.manifest.list.v2+json``
============================  ==============================================================

Docker schema 1 (signed, deprecated since 2017) and non-image artifacts (Helm charts, SBOMs:
a config media type that is not an image config) are refused with a message saying so.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from nydusfs.errors import ConfigError, FormatError, IntegrityError, NotFoundError

__all__ = [
    "IMAGE_CONFIG_TYPES",
    "INDEX_TYPES",
    "MANIFEST_TYPES",
    "MAX_MANIFEST_SIZE",
    "MEDIA_DOCKER_CONFIG",
    "MEDIA_DOCKER_LIST",
    "MEDIA_DOCKER_MANIFEST",
    "MEDIA_OCI_CONFIG",
    "MEDIA_OCI_INDEX",
    "MEDIA_OCI_MANIFEST",
    "Descriptor",
    "Index",
    "Manifest",
    "Platform",
    "check_digest",
    "compute_digest",
    "parse_manifest_or_index",
]

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
_MEDIA_DOCKER_V1 = ("application/vnd.docker.distribution.manifest.v1+json",
                    "application/vnd.docker.distribution.manifest.v1+prettyjws")

MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
IMAGE_CONFIG_TYPES = (MEDIA_OCI_CONFIG, MEDIA_DOCKER_CONFIG)

# distribution refuses manifests above 4 MiB; so do we, before parsing any of it.
MAX_MANIFEST_SIZE = 4 << 20

_DIGESTS = {"sha256": re.compile(r"sha256:[0-9a-f]{64}"),
            "sha512": re.compile(r"sha512:[0-9a-f]{128}")}
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/"
                         r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")


def check_digest(digest: object, where: str) -> str:
    """``digest`` if it is ``sha256:<64 hex>`` or ``sha512:<128 hex>``; else ``FormatError``."""
    if isinstance(digest, str):
        algo = digest.partition(":")[0]
        pattern = _DIGESTS.get(algo)
        if pattern is not None and pattern.fullmatch(digest):
            return digest
        if pattern is None and ":" in digest:
            raise FormatError(f"{where}: unsupported digest algorithm {algo[:32]!r} "
                              "(sha256 and sha512 are supported)")
    raise FormatError(f"{where}: invalid digest {_show(digest)}")


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    """``"<algorithm>:<hex>"`` of ``data``."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _verify(raw: bytes, digest: str, what: str) -> None:
    algo = check_digest(digest, what).partition(":")[0]
    actual = compute_digest(raw, algo)
    if actual != digest:
        raise IntegrityError(f"{what}: content hashes to {actual}, not {digest}")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _load(raw: bytes, what: str) -> dict[str, object]:
    if len(raw) > MAX_MANIFEST_SIZE:
        raise FormatError(f"{what}: {len(raw)} bytes, more than the {MAX_MANIFEST_SIZE} "
                          "allowed for a manifest")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{what}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise FormatError(f"{what}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _string_map(raw: object, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise FormatError(f"{where}: expected an object of strings, got {_show(raw)}")
    for k, v in raw.items():
        if not isinstance(v, str):
            raise FormatError(f"{where}.{k}: expected a string, got {_show(v)}")
    return dict(raw)


def _media_type(raw: object, where: str) -> str:
    if not isinstance(raw, str) or not _MEDIA_TYPE.fullmatch(raw):
        raise FormatError(f"{where}: invalid media type {_show(raw)}")
    return raw


@dataclass(frozen=True, slots=True)
class Platform:
    """``os/architecture[/variant]`` as ``--platform`` spells it (``linux/arm64/v8``).

    User input: a malformed one is :class:`~nydusfs.errors.ConfigError`.
    """

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise ConfigError(f"{text!r}: invalid platform (expected os/arch[/variant], "
                              "e.g. linux/amd64)")
        return cls(parts[0].lower(), parts[1].lower(), parts[2].lower() if len(parts) == 3
                   else None)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


# Variants a platform has when none is written (containerd's normalisation).
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


def _variant(arch: str, variant: str | None) -> str | None:
    return variant or _DEFAULT_VARIANT.get(arch)


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A pointer to content: media type, digest and size (and for index entries a platform)."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Mapping[str, str] | None = None  # index entries: os, architecture, variant, ...

    def to_json(self) -> dict[str, object]:
        """The OCI descriptor JSON object (key order as the spec writes them)."""
        out: dict[str, object] = {"mediaType": self.media_type, "digest": self.digest,
                                  "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = dict(self.platform)
        return out

    @classmethod
    def from_json(cls, raw: object, where: str) -> Descriptor:
        """Validate a descriptor object; ``FormatError`` names ``where`` and the field."""
        if not isinstance(raw, dict):
            raise FormatError(f"{where}: expected a descriptor object, got {_show(raw)}")
        media_type = _media_type(raw.get("mediaType"), f"{where}.mediaType")
        digest = check_digest(raw.get("digest"), f"{where}.digest")
        size = raw.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError(f"{where}.size: expected a non-negative integer, got {_show(size)}")
        annotations = _string_map(raw.get("annotations"), f"{where}.annotations")
        platform: dict[str, str] | None = None
        if raw.get("platform") is not None:
            p = raw["platform"]
            if not isinstance(p, dict):
                raise FormatError(f"{where}.platform: expected an object, got {_show(p)}")
            platform = {}
            for key in ("os", "architecture", "variant", "os.version"):
                value = p.get(key)
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise FormatError(f"{where}.platform.{key}: expected a string, "
                                      f"got {_show(value)}")
                platform[key] = value
            for key in ("os", "architecture"):
                if key not in platform:
                    raise FormatError(f"{where}.platform.{key}: required")
        return cls(media_type, digest, size, annotations, platform)


def _doc_media_type(doc: dict[str, object], header_type: str | None, what: str) -> str:
    """The media type: the document's own ``mediaType``, else the Content-Type, else guessed."""
    body_type = doc.get("mediaType")
    if body_type is not None:
        return _media_type(body_type, f"{what}: mediaType")
    if header_type and header_type not in ("application/json", "application/octet-stream",
                                           "text/plain"):
        return header_type
    # OCI allows omitting mediaType; tell the two kinds apart by shape
    if "manifests" in doc:
        return MEDIA_OCI_INDEX
    return MEDIA_OCI_MANIFEST


def _check_schema(doc: dict[str, object], media_type: str, what: str) -> None:
    version = doc.get("schemaVersion")
    if media_type in _MEDIA_DOCKER_V1 or version == 1:
        raise FormatError(f"{what}: Docker schema 1 manifests are not supported "
                          "(push the image again with a current docker, or skopeo copy)")
    if version != 2 or isinstance(version, bool):
        raise FormatError(f"{what}: schemaVersion: expected 2, got {_show(version)}")


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest (OCI or Docker v2 schema 2): config and layers."""

    media_type: str
    digest: str  # of raw
    raw: bytes  # exactly the bytes fetched
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str]

    @classmethod
    def parse(cls, raw: bytes, media_type: str, digest: str) -> Manifest:
        """Validate an image manifest; indexes and non-images are ``FormatError``.

        ``media_type`` is the Content-Type it was served with (the document's own
        ``mediaType`` wins); ``digest`` the one it was fetched under (``IntegrityError`` if
        the bytes do not hash to it).
        """
        what = f"manifest {digest}"
        _verify(raw, digest, what)
        doc = _load(raw, what)
        kind = _doc_media_type(doc, media_type, what)
        if kind in INDEX_TYPES:
            raise FormatError(f"{what} is an image index, not an image manifest "
                              "(select a platform's manifest from it)")
        _check_schema(doc, kind, what)
        if kind not in MANIFEST_TYPES:
            raise FormatError(f"{what}: media type {kind!r} is not an image manifest "
                              f"(expected one of {', '.join(MANIFEST_TYPES)})")
        config = Descriptor.from_json(doc.get("config"), f"{what}: config")
        if config.media_type not in IMAGE_CONFIG_TYPES:
            raise FormatError(f"{what} is not a container image: its config has media type "
                              f"{config.media_type!r} (an artifact such as a Helm chart?)")
        raw_layers = doc.get("layers")
        if not isinstance(raw_layers, list):
            raise FormatError(f"{what}: layers: expected a list, got {_show(raw_layers)}")
        layers = tuple(Descriptor.from_json(d, f"{what}: layers[{i}]")
                       for i, d in enumerate(raw_layers))
        annotations = _string_map(doc.get("annotations"), f"{what}: annotations")
        return cls(kind, digest, raw, config, layers, annotations)

    def descriptor(self) -> Descriptor:
        """A descriptor pointing at this manifest."""
        return Descriptor(self.media_type, self.digest, len(self.raw))


@dataclass(frozen=True, slots=True)
class Index:
    """An image index / manifest list: one manifest per platform."""

    media_type: str
    digest: str
    raw: bytes
    manifests: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, raw: bytes, media_type: str, digest: str) -> Index:
        """Validate an image index (OCI) or manifest list (Docker); see :meth:`Manifest.parse`."""
        what = f"index {digest}"
        _verify(raw, digest, what)
        doc = _load(raw, what)
        kind = _doc_media_type(doc, media_type, what)
        if kind in MANIFEST_TYPES:
            raise FormatError(f"{what} is an image manifest, not an index")
        _check_schema(doc, kind, what)
        if kind not in INDEX_TYPES:
            raise FormatError(f"{what}: media type {kind!r} is not an image index "
                              f"(expected one of {', '.join(INDEX_TYPES)})")
        raw_manifests = doc.get("manifests")
        if not isinstance(raw_manifests, list):
            raise FormatError(f"{what}: manifests: expected a list, got {_show(raw_manifests)}")
        manifests = tuple(Descriptor.from_json(d, f"{what}: manifests[{i}]")
                          for i, d in enumerate(raw_manifests))
        return cls(kind, digest, raw, manifests)

    def select(self, platform: str) -> Descriptor:
        """The manifest for ``platform`` (``os/arch[/variant]``); ``NotFoundError`` if none.

        Entries that are not image manifests (attestations, nested indexes) are skipped.
        Without a requested variant the first entry for os/arch wins (``linux/arm64`` matches
        ``linux/arm64/v8``); with one, missing variants take their default (arm64 -> v8,
        arm -> v7) before comparing.
        """
        want = Platform.parse(platform)
        seen: list[str] = []
        for d in self.manifests:
            if d.platform is None:
                continue
            os_, arch = d.platform["os"].lower(), d.platform["architecture"].lower()
            variant = d.platform.get("variant")
            seen.append("/".join(p for p in (os_, arch, variant) if p))
            if d.media_type not in MANIFEST_TYPES:
                continue
            if (os_, arch) != (want.os, want.architecture):
                continue
            if want.variant is not None and (_variant(arch, variant and variant.lower())
                                             != _variant(want.architecture, want.variant)):
                continue
            return d
        available = ", ".join(dict.fromkeys(seen)) or "none with a platform"
        raise NotFoundError(f"index {self.digest}: no image for platform {want} "
                            f"(available: {available})")


def parse_manifest_or_index(raw: bytes, media_type: str, digest: str) -> Manifest | Index:
    """Whichever of the two ``raw`` is (by its ``mediaType``, Content-Type or shape)."""
    what = f"manifest {digest}"
    doc = _load(raw, what)
    kind = _doc_media_type(doc, media_type, what)
    if kind in INDEX_TYPES:
        return Index.parse(raw, kind, digest)
    return Manifest.parse(raw, kind, digest)
