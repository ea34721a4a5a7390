"""Fixtures for the OCI client tests: real docker-registry processes, one per auth mode.

Each registry is started once per session (about 0.1 s each) and stopped by PID at the end;
tests use distinct repository names so they do not see each other's blobs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import pytest
from registry_server import RegistryServer

from nydusfs.oci import (
    MEDIA_DOCKER_CONFIG,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_MANIFEST,
    ClientOptions,
    RegistryClient,
)

T = TypeVar("T")


def _serve(factory: pytest.TempPathFactory, auth: str | None) -> Iterator[RegistryServer]:
    server = RegistryServer(factory.mktemp(f"registry-{auth or 'open'}"),
                            auth=auth)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """No auth: anyone may pull and push."""
    yield from _serve(tmp_path_factory, None)


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """htpasswd Basic auth; user ``alice`` / ``wonderland``."""
    yield from _serve(tmp_path_factory, "htpasswd")


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """Bearer token auth with a test issuer; user ``alice`` / ``wonderland``."""
    yield from _serve(tmp_path_factory, "token")


# -- helpers shared by the client tests (imported with ``from .conftest import ...``) ---------

def run(coro: Coroutine[Any, Any, T]) -> T:
    """pytest-asyncio is not a dependency: each test drives its coroutine itself."""
    return asyncio.run(coro)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def options_for(server: RegistryServer, **kw: Any) -> ClientOptions:
    """Options with the server's first user's credentials when it has auth."""
    if server.auth is not None and "username" not in kw:
        kw["username"], kw["password"] = server.credentials()
    return ClientOptions(**kw)


def image_config(arch: str = "amd64", layers: Sequence[bytes] = ()) -> bytes:
    return json.dumps({"architecture": arch, "os": "linux",
                       "config": {"Cmd": ["/bin/sh"]},
                       "rootfs": {"type": "layers",
                                  "diff_ids": [sha(layer) for layer in layers]}}).encode()


def manifest_json(config: bytes, layers: Sequence[bytes], *, docker: bool = False) -> bytes:
    if docker:
        mt, ct = MEDIA_DOCKER_MANIFEST, MEDIA_DOCKER_CONFIG
        lt = "application/vnd.docker.image.rootfs.diff.tar"
    else:
        mt, ct, lt = MEDIA_OCI_MANIFEST, MEDIA_OCI_CONFIG, "application/vnd.oci.image.layer.v1.tar"
    return json.dumps({"schemaVersion": 2, "mediaType": mt,
                       "config": {"mediaType": ct, "digest": sha(config), "size": len(config)},
                       "layers": [{"mediaType": lt, "digest": sha(layer), "size": len(layer)}
                                  for layer in layers]}).encode()


async def push_image(client: RegistryClient, repository: str, tag: str,
                     layers: Sequence[bytes], *, arch: str = "amd64",
                     docker: bool = False) -> str:
    """Push config, layers and manifest with the client under test; the manifest digest."""
    config = image_config(arch, layers)
    for blob in (config, *layers):
        await client.push_blob(repository, sha(blob), blob)
    body = manifest_json(config, layers, docker=docker)
    return await client.put_manifest(repository, tag, body,
                                     MEDIA_DOCKER_MANIFEST if docker else MEDIA_OCI_MANIFEST)
