"""Mount config: defaults, both backend forms, sizes, and errors that name their field."""

from __future__ import annotations

from pathlib import Path

import pytest

from nydusfs.config import (
    DEFAULT_CACHE_DIR,
    BackendConfig,
    HostPort,
    LocalFsConfig,
    MountConfig,
    load_config,
    parse_config,
)
from nydusfs.errors import ConfigError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def _load(tmp_path: Path, text: str) -> MountConfig:
    path = tmp_path / "mount.yaml"
    path.write_text(text)
    return load_config(path)


def test_defaults() -> None:
    cfg = load_config(None)
    assert cfg == MountConfig()
    assert cfg.backend == BackendConfig(type="localfs", localfs=LocalFsConfig(dir=None))
    assert cfg.cache.enabled is None and cfg.cache_enabled is False  # localfs: no cache
    assert cfg.cache.dir == DEFAULT_CACHE_DIR and cfg.cache.quota == 10 * GiB
    assert (cfg.prefetch.all, cfg.prefetch.bandwidth, cfg.prefetch.concurrency) == (False, 0, 4)
    assert cfg.metrics is None and cfg.access_trace is None
    assert cfg.fuse.allow_other is True
    assert cfg.read.merge_window == 128 * KiB and cfg.read.cache_chunks == 64 * MiB


@pytest.mark.parametrize("text", ["", "# nothing\n", "{}\n", "cache:\nfuse:\n"])
def test_empty_documents_and_sections_are_defaults(tmp_path: Path, text: str) -> None:
    assert _load(tmp_path, text) == MountConfig()


def test_backend_string_form(tmp_path: Path) -> None:
    assert _load(tmp_path, "backend: memory\n").backend == BackendConfig(type="memory")


def test_backend_mapping_form_and_relative_dir(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "backend:\n  type: localfs\n  timeout: 250ms\n  attempts: 2\n"
                          "  localfs:\n    dir: blobs\n")
    assert cfg.backend == BackendConfig(type="localfs", timeout=0.25, attempts=2,
                                        localfs=LocalFsConfig(dir=tmp_path / "blobs"))
    cfg = _load(tmp_path, "backend: {type: localfs, localfs: {dir: /mnt/nas}}\n")
    assert cfg.backend.localfs.dir == Path("/mnt/nas")
    cfg = _load(tmp_path, "backend: {type: localfs, localfs: {}}\n")
    assert cfg.backend.localfs.dir is None


def test_full_config(tmp_path: Path) -> None:
    cfg = _load(tmp_path, """
backend: {type: localfs, localfs: {dir: /srv/blobs}}
cache: {dir: /var/cache/x, quota: 512MiB, enabled: true}
prefetch: {all: true, bandwidth: 10MiB/s, concurrency: 8}
metrics: 127.0.0.1:9100
access_trace: trace.txt
fuse: {allow_other: false, entry_timeout: 60, attr_timeout: 1.5}
read: {merge_window: 1M, cache_chunks: 256MiB, readahead_chunks: 0}
""")
    assert cfg.cache_enabled is True and cfg.cache.quota == 512 * MiB
    assert cfg.cache.dir == Path("/var/cache/x")
    assert cfg.prefetch.all and cfg.prefetch.bandwidth == 10 * MiB
    assert cfg.prefetch.concurrency == 8
    assert cfg.metrics == HostPort("127.0.0.1", 9100) and str(cfg.metrics) == "127.0.0.1:9100"
    assert cfg.access_trace == tmp_path / "trace.txt"
    assert (cfg.fuse.allow_other, cfg.fuse.entry_timeout, cfg.fuse.attr_timeout) == \
        (False, 60.0, 1.5)
    assert (cfg.read.merge_window, cfg.read.cache_chunks, cfg.read.readahead_chunks) == \
        (MiB, 256 * MiB, 0)


@pytest.mark.parametrize("text, expected", [
    ("65536", 65536), ("512KiB", 512 * KiB), ("512K", 512 * KiB), ("10GiB", 10 * GiB),
    ("4MB", 4 * MiB), ("1 T", 1 << 40), ("7", 7),
])
def test_sizes_with_units(text: str, expected: int) -> None:
    assert parse_config({"cache": {"quota": text}}, base_dir=Path()).cache.quota == expected
    assert parse_config({"cache": {"quota": expected}}, base_dir=Path()).cache.quota == expected


def test_ipv6_metrics_address() -> None:
    cfg = parse_config({"metrics": "[::1]:9100"}, base_dir=Path())
    assert cfg.metrics == HostPort("::1", 9100) and str(cfg.metrics) == "[::1]:9100"


@pytest.mark.parametrize("doc, message", [
    ({"cache": {"quota": "12Q"}}, "cache.quota: invalid size '12Q'"),
    ({"cache": {"quota": 0}}, "cache.quota: must be >= 1"),
    ({"cache": {"quota": 1.5}}, "cache.quota: expected a size"),
    ({"cache": {"enabled": "yes"}}, "cache.enabled: expected true or false"),
    ({"cache": {"dir": ""}}, "cache.dir: expected a non-empty path"),
    ({"cache": []}, "cache: expected a mapping"),
    ({"prefetch": {"bandwidth": "fast"}}, "prefetch.bandwidth: invalid size 'fast'"),
    ({"prefetch": {"bandwidth": -1}}, "prefetch.bandwidth: must be >= 0"),
    ({"prefetch": {"concurrency": 0}}, "prefetch.concurrency: must be >= 1"),
    ({"prefetch": {"concurrency": True}}, "prefetch.concurrency: expected an integer"),
    ({"prefetch": {"all": 1}}, "prefetch.all: expected true or false"),
    ({"metrics": "localhost"}, "metrics: expected HOST:PORT"),
    ({"metrics": ":9100"}, "metrics: expected HOST:PORT"),
    ({"metrics": "h:99999"}, "metrics: expected HOST:PORT"),
    ({"metrics": 9100}, "metrics: expected HOST:PORT"),
    ({"access_trace": 3}, "access_trace: expected a non-empty path"),
    ({"fuse": {"allow_other": "no"}}, "fuse.allow_other: expected true or false"),
    ({"fuse": {"entry_timeout": -1}}, "fuse.entry_timeout: must be >= 0"),
    ({"fuse": {"attr_timeout": "soon"}}, "fuse.attr_timeout: invalid duration 'soon'"),
    ({"read": {"merge_window": "big"}}, "read.merge_window: invalid size 'big'"),
    ({"read": {"cache_chunks": -5}}, "read.cache_chunks: must be >= 0"),
    ({"read": {"readahead_chunks": "4"}}, "read.readahead_chunks: expected an integer"),
    ({"backend": "ftp"},
     "backend: unknown backend 'ftp' (known: dragonfly, localfs, memory, registry, s3)"),
    ({"backend": "s3"}, "backend: backend s3 needs a bucket"),
    ({"backend": {"type": "s3"}}, "backend.s3.bucket: required for backend s3"),
    ({"backend": {"type": "s3", "s3": {"bucket": "b", "addressing": "dns"}}},
     "backend.s3.addressing: expected path or virtual"),
    ({"backend": {"type": "s3", "s3": {"bucket": "b", "endpoint": "localhost:9000"}}},
     "backend.s3.endpoint: expected an http:// or https:// URL"),
    ({"backend": {"type": "s3", "s3": {"bucket": "b", "access_key_id": "k"}}},
     "backend.s3.secret_access_key: access_key_id and secret_access_key go together"),
    ({"backend": {"type": "s3", "s3": {"bucket": "b", "colour": "red"}}},
     "backend.s3.colour: unknown key"),
    ({"backend": {"type": "registry", "registry": {"username": "u"}}},
     "backend.registry.password: username and password go together"),
    ({"backend": {"type": "registry", "registry": {"plain_http": "yes"}}},
     "backend.registry.plain_http: expected true or false"),
    ({"backend": {"type": "registry", "registry": {"host": 5}}},
     "backend.registry.host: expected a non-empty string"),
    ({"backend": {"type": "ftp"}},
     "backend.type: unknown backend 'ftp' (known: dragonfly, localfs, memory, registry, s3)"),
    ({"backend": {"type": "dragonfly", "dragonfly": {"fallback": "ftp"}}},
     "backend.dragonfly.fallback: expected one of registry, s3, localfs"),
    ({"backend": {"type": "dragonfly", "dragonfly": {"fallback": "s3"}}},
     "backend.s3.bucket: required for the dragonfly fallback s3"),
    ({"backend": {"type": "dragonfly", "dragonfly": {"sock": "/x"}}},
     "backend.dragonfly.sock: unknown key (known: socket, fallback, timeout, retry_after)"),
    ({"backend": {"type": "dragonfly", "dragonfly": {"timeout": 0}}},
     "backend.dragonfly.timeout: must be > 0"),
    ({"backend": {"localfs": {"dir": "/x"}}}, "backend.type: required"),
    ({"backend": {"type": 3}}, "backend.type: expected a backend name"),
    ({"backend": {"type": "localfs", "localfs": {"dir": 5}}},
     "backend.localfs.dir: expected a non-empty path"),
    ({"backend": {"type": "localfs", "localfs": "/x"}}, "backend.localfs: expected a mapping"),
    ({"backend": {"type": "localfs", "dragonfly": 3}}, "backend.dragonfly: expected a mapping"),
    ({"backend": {"type": "localfs", "timeout": 0}}, "backend.timeout: must be > 0"),
    ({"backend": {"type": "localfs", "attempts": 0}}, "backend.attempts: must be >= 1"),
    ({"backend": 7}, "backend: expected a mapping"),
    ([1, 2], "<config>: expected a mapping"),
])
def test_errors_name_their_field(doc: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base_dir=Path())
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("doc, message", [
    ({"cahce": {}}, "cahce: unknown key (known: backend, cache,"),
    ({"cache": {"quota": "1G", "size": 1, "path": "/x"}},
     "cache.path, cache.size: unknown keys (known: enabled, dir, quota)"),
    ({"prefetch": {"al": True}}, "prefetch.al: unknown key"),
    ({"backend": {"type": "localfs", "localfs": {"directory": "/x"}}},
     "backend.localfs.directory: unknown key (known: dir)"),
    ({"backend": {"type": "localfs", "retries": 3}}, "backend.retries: unknown key"),
    ({"fuse": {"allow-other": True}}, "fuse.allow-other: unknown key"),
    ({"read": {1: 2}}, "read.1: keys must be strings"),
])
def test_unknown_keys_are_named(doc: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base_dir=Path())
    assert str(info.value).startswith(message), str(info.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        _load(tmp_path, "cache: {quota: [\n")


def test_memory_blobs_from_yaml(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "backend:\n  type: memory\n  memory:\n    blobs: {aa: text}\n")
    assert cfg.backend.memory.blobs == {"aa": b"text"}
    assert cfg.cache_enabled is False


def test_registry_and_s3_sections(tmp_path: Path) -> None:
    doc = {"backend": {"type": "s3", "s3": {
        "bucket": "layers", "endpoint": "http://127.0.0.1:8333", "prefix": "/images/",
        "access_key_id": "k", "secret_access_key": "s", "addressing": "virtual",
        "ca_file": "ca.pem"}}}
    s3 = parse_config(doc, base_dir=tmp_path).backend.s3
    assert (s3.bucket, s3.endpoint, s3.prefix, s3.addressing) == (
        "layers", "http://127.0.0.1:8333", "images", "virtual")
    assert s3.ca_file == tmp_path / "ca.pem"
    doc = {"backend": {"type": "registry", "registry": {
        "host": "127.0.0.1:5000", "repository": "library/py", "plain_http": True,
        "auth_file": "auth.json", "username": "u", "password": "p"}}}
    reg = parse_config(doc, base_dir=tmp_path).backend.registry
    assert (reg.host, reg.repository, reg.plain_http) == ("127.0.0.1:5000", "library/py", True)
    assert reg.auth_file == tmp_path / "auth.json"
    assert (reg.username, reg.password) == ("u", "p")
