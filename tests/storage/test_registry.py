"""``create_backend``: names from one registry, lazy imports, and the one wrapper stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nydusfs.config import BackendConfig, LocalFsConfig, RegistryConfig, S3Config
from nydusfs.errors import ConfigError
from nydusfs.storage import (
    BACKENDS,
    CountingBackend,
    RetryingBackend,
    TimeoutBackend,
    create_backend,
)
from nydusfs.storage.localfs import LocalFsBackend

from .helpers import blob_name, run, write_blobs


def test_unknown_backend_lists_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        create_backend(BackendConfig(type="ftp"), image_dir=None)
    assert str(info.value) == ("backend.type: unknown backend 'ftp' "
                               "(known: dragonfly, localfs, memory, registry, s3)")


def test_dragonfly_is_registered_and_needs_its_source() -> None:
    assert "dragonfly" in BACKENDS
    with pytest.raises(ConfigError, match=r"^backend.localfs.dir: required for the dragonfly "
                                          r"fallback localfs"):
        create_backend(BackendConfig(type="dragonfly"), image_dir=None)


def test_stack_is_counting_retry_timeout_backend(tmp_path: Path) -> None:
    be = create_backend(BackendConfig(timeout=7, attempts=3), image_dir=tmp_path)
    assert isinstance(be, CountingBackend)
    retry = be.inner
    assert isinstance(retry, RetryingBackend) and retry.attempts == 3
    timeout = retry.inner
    assert isinstance(timeout, TimeoutBackend) and timeout.timeout == 7
    assert isinstance(timeout.inner, LocalFsBackend)
    assert be.name == "localfs"


def test_localfs_defaults_to_blobs_beside_the_bootstrap(tmp_path: Path) -> None:
    data = b"some chunk bytes"
    write_blobs(tmp_path / "blobs", {blob_name(data): data})
    be = create_backend(BackendConfig(type="localfs"), image_dir=tmp_path)
    assert run(be.read(blob_name(data), 5, 5)) == data[5:10]
    assert be.ranges == {blob_name(data): [(5, 10)]}
    run(be.close())


def test_localfs_configured_dir_wins(tmp_path: Path) -> None:
    be = create_backend(BackendConfig(localfs=LocalFsConfig(dir=tmp_path / "nas")),
                        image_dir=tmp_path)
    inner = be.inner.inner.inner  # type: ignore[attr-defined]
    assert isinstance(inner, LocalFsBackend) and inner.dir == tmp_path / "nas"


def test_localfs_without_any_dir_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^backend.localfs.dir: required"):
        create_backend(BackendConfig(type="localfs"), image_dir=None)


# The least each backend needs to be built (nothing is contacted until the first read).
_MINIMAL = {
    "registry": BackendConfig(type="registry", registry=RegistryConfig(
        host="127.0.0.1:5000", repository="library/x")),
    "s3": BackendConfig(type="s3", s3=S3Config(bucket="layers", endpoint="http://127.0.0.1:9")),
    "dragonfly": BackendConfig(type="dragonfly", registry=RegistryConfig(
        host="127.0.0.1:5000", repository="library/x")),
}


def test_every_registered_factory_resolves() -> None:
    for name in BACKENDS:
        cfg = _MINIMAL.get(name, BackendConfig(type=name))
        be = create_backend(cfg, image_dir=Path("/img"))
        assert be.name == name
        run(be.close())


def test_backends_are_imported_lazily() -> None:
    code = ("import sys, nydusfs.storage, nydusfs.config; "
            "print(sorted(m for m in sys.modules if m.startswith('nydusfs.storage.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "localfs" not in out and "memory" not in out
