"""OCI distribution: image references, manifests, and a registry client (pull and push).

The layer between nydusfs and registries (Docker Hub, GHCR, Harbor, distribution). It speaks
HTTP and JSON and hands out validated value types and digest-checked bytes; it never builds
images (``oci.image`` / ``oci.convert`` do) and never touches the filesystem layer::

    reference.py   Reference.parse("python:3.11") -> docker.io/library/python:3.11
    manifest.py    Descriptor, Manifest, Index: untrusted JSON validated where it enters
    auth.py        credentials lookup, WWW-Authenticate, Bearer tokens cached per scope
    client.py      RegistryClient: get/put manifests, get/download/range-read/push blobs

See docs/registry.md for auth, TLS, retries and redirects.
"""

from __future__ import annotations

from nydusfs.oci.client import ClientOptions, RegistryClient
from nydusfs.oci.manifest import (
    MEDIA_DOCKER_CONFIG,
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
)
from nydusfs.oci.reference import Reference

__all__ = [
    "MEDIA_DOCKER_CONFIG",
    "MEDIA_DOCKER_LIST",
    "MEDIA_DOCKER_MANIFEST",
    "MEDIA_OCI_CONFIG",
    "MEDIA_OCI_INDEX",
    "MEDIA_OCI_MANIFEST",
    "ClientOptions",
    "Descriptor",
    "Index",
    "Manifest",
    "Reference",
    "RegistryClient",
]
