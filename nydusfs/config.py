"""The mount configuration: typed dataclasses, loaded once at the edge from YAML.

``nydusfs mount --config FILE`` calls :func:`load_config`; everything below the CLI receives a
:class:`MountConfig` and never sees raw YAML. Defaults live on the dataclass fields (the one
place to read them; docs/configuration.md mirrors them). Validation happens here, while the
dotted path of each value is known, so every :class:`~nydusfs.errors.ConfigError` starts with
the field it is about (``cache.quota: invalid size '12Q'``). Unknown keys are errors, not
ignored: a misspelt ``prefetch.al: true`` silently doing nothing is worse than a refusal.

The backend follows the "``type`` + one block per backend" shape::

    backend: localfs                          # string form: that backend with its defaults
    backend: {type: localfs, localfs: {dir: /mnt/nas/blobs}}

Relative paths are resolved against the directory of the config file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import yaml

from nydusfs.errors import BuildError, ConfigError
from nydusfs.storage import RESERVED_BACKENDS, UNCACHED_BACKENDS, check_backend_type

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_DRAGONFLY_SOCKET",
    "BackendConfig",
    "CacheConfig",
    "DragonflyConfig",
    "FuseConfig",
    "HostPort",
    "LocalFsConfig",
    "MemoryConfig",
    "MountConfig",
    "PrefetchConfig",
    "ReadConfig",
    "RegistryConfig",
    "S3Config",
    "load_config",
    "parse_config",
    "read_yaml",
]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

DEFAULT_CACHE_DIR = Path("/var/lib/nydusfs/cache")
DEFAULT_DRAGONFLY_SOCKET = Path("/run/dfagent/dfagent.sock")
DRAGONFLY_FALLBACKS = ("registry", "s3", "localfs")


@dataclass(frozen=True, slots=True)
class LocalFsConfig:
    # None: the ``blobs/`` directory beside the bootstrap (filled in by create_backend).
    dir: Path | None = None


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    # Blob name → bytes. For tests; in YAML, string values are taken as UTF-8.
    blobs: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """Where an image's blobs live in an OCI registry, and how to reach it.

    ``nydusfs mount REF`` fills ``host`` and ``repository`` from the reference; a config file
    may set them for a bootstrap mounted from disk whose blobs live in a registry.
    """

    host: str | None = None  # registry host[:port], e.g. ghcr.io or 127.0.0.1:5000
    repository: str | None = None  # e.g. library/python
    plain_http: bool | None = None  # None: HTTP on loopback (as docker does), HTTPS elsewhere
    insecure_skip_verify: bool = False  # TLS without certificate checks
    ca_file: Path | None = None  # extra CA bundle (PEM) for the registry's certificate
    auth_file: Path | None = None  # docker-style config.json; None: the usual places
    username: str | None = None  # with password: Basic / token credentials, over auth_file
    password: str | None = None


@dataclass(frozen=True, slots=True)
class S3Config:
    """An S3-compatible bucket holding blobs as ``<prefix>/<sha256 hex>``.

    Keys left unset come from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (and
    ``AWS_SESSION_TOKEN``); with no keys at all, requests are sent unsigned.
    """

    bucket: str = ""
    endpoint: str | None = None  # None: AWS, https://s3.<region>.amazonaws.com
    region: str = "us-east-1"
    prefix: str = ""
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    addressing: str | None = None  # path | virtual; None: path with an endpoint, else virtual
    insecure_skip_verify: bool = False
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class DragonflyConfig:
    """Chunks through the node's dfagent peer (its local API on a Unix socket).

    ``fallback`` names which of the backend's other blocks is the image's own source: where
    the agent fetches chunks no peer has, and where nydusfs reads itself when the agent is
    unreachable. ``None``: ``registry`` when ``backend.registry.host`` is set (``nydusfs
    mount REF`` sets it), else ``s3`` when ``backend.s3.bucket`` is, else ``localfs``.
    """

    socket: Path = DEFAULT_DRAGONFLY_SOCKET
    fallback: str | None = None  # registry | s3 | localfs
    timeout: float = 20.0  # seconds a live agent may take for one batch before nydusfs falls back
    retry_after: float = 5.0  # seconds an unreachable agent is left alone before a new try


@dataclass(frozen=True, slots=True)
class BackendConfig:
    type: str = "localfs"
    timeout: float = 30.0  # seconds per attempt; then the attempt counts as unavailable
    attempts: int = 4  # tries per read for transient failures (1 = no retry)
    localfs: LocalFsConfig = field(default_factory=LocalFsConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    s3: S3Config = field(default_factory=S3Config)
    dragonfly: DragonflyConfig = field(default_factory=DragonflyConfig)

    @property
    def source_type(self) -> str:
        """The image's own source: the backend itself, or a dragonfly backend's fallback."""
        if self.type != "dragonfly":
            return self.type
        if self.dragonfly.fallback is not None:
            return self.dragonfly.fallback
        if self.registry.host:
            return "registry"
        return "s3" if self.s3.bucket else "localfs"


@dataclass(frozen=True, slots=True)
class CacheConfig:
    # None: on for remote backends, off for local ones (localfs, memory) whose blobs are
    # already on a disk — caching them would only copy bytes.
    enabled: bool | None = None
    dir: Path = DEFAULT_CACHE_DIR
    quota: int = 10 * GiB  # bytes; least recently used chunks are evicted above it


@dataclass(frozen=True, slots=True)
class PrefetchConfig:
    all: bool = False  # after the prefetch list, fetch every chunk in the background
    bandwidth: int = 0  # bytes per second for background prefetch; 0 = unlimited
    concurrency: int = 4  # background fetches in flight


class HostPort(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class FuseConfig:
    allow_other: bool = True  # containers run as other users than the mounter
    entry_timeout: float = 3600.0  # seconds; the image is immutable, so long is safe
    attr_timeout: float = 3600.0


@dataclass(frozen=True, slots=True)
class ReadConfig:
    merge_window: int = 128 * KiB  # neighbouring chunks closer than this are fetched together
    cache_chunks: int = 64 * MiB  # bytes of decompressed chunks kept in the memory LRU
    readahead_chunks: int = 8  # chunks fetched ahead of a sequential reader; 0 = off
    # A bootstrap up to this size is copied into memory once the mount is ready (metadata
    # served without page faults, immune to the file changing); 0 = always keep it mapped.
    bootstrap_memory: int = 256 * MiB


@dataclass(frozen=True, slots=True)
class MountConfig:
    backend: BackendConfig = field(default_factory=BackendConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    metrics: HostPort | None = None  # Prometheus endpoint; None = off
    access_trace: Path | None = None  # file to record the order files are read in
    fuse: FuseConfig = field(default_factory=FuseConfig)
    read: ReadConfig = field(default_factory=ReadConfig)

    @property
    def cache_enabled(self) -> bool:
        """Whether the local chunk cache is used, resolving ``cache.enabled: null`` (auto)."""
        if self.cache.enabled is not None:
            return self.cache.enabled
        return self.backend.type not in UNCACHED_BACKENDS


def load_config(path: Path | str | None) -> MountConfig:
    """Read and validate a mount config file; ``None`` gives every default."""
    if path is None:
        return MountConfig()
    path = Path(path)
    return parse_config(read_yaml(path), base_dir=path.parent)


def read_yaml(path: Path) -> object:
    """A config file's parsed YAML; unreadable or invalid files are a ``ConfigError`` naming it.

    Shared by every config loader (nydusfs mounts, the dfagent supernode and peer), so all
    report a bad file the same way.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc


def parse_config(raw: object, *, base_dir: Path) -> MountConfig:
    """Validate an already-parsed document (``None`` = empty); relative paths join ``base_dir``."""
    doc = _section(raw, "")
    _check_keys(doc, "", ("backend", "cache", "prefetch", "metrics", "access_trace", "fuse",
                          "read"))
    kw: dict[str, object] = {}
    if "backend" in doc:
        kw["backend"] = _backend(doc["backend"], base_dir)
    if "cache" in doc:
        kw["cache"] = _cache(doc["cache"], base_dir)
    if "prefetch" in doc:
        kw["prefetch"] = _prefetch(doc["prefetch"])
    if doc.get("metrics") is not None:
        kw["metrics"] = _host_port(doc["metrics"], "metrics")
    if doc.get("access_trace") is not None:
        kw["access_trace"] = _path(doc["access_trace"], "access_trace", base_dir)
    if "fuse" in doc:
        kw["fuse"] = _fuse(doc["fuse"])
    if "read" in doc:
        kw["read"] = _read(doc["read"])
    return MountConfig(**kw)  # type: ignore[arg-type]  # keys and types checked above


# -- sections -----------------------------------------------------------------------------

def _backend(raw: object, base_dir: Path) -> BackendConfig:
    if isinstance(raw, str):
        check_backend_type(raw, "backend")
        if raw == "s3":
            raise ConfigError("backend: backend s3 needs a bucket "
                              "(backend: {type: s3, s3: {bucket: ...}})")
        return BackendConfig(type=raw)
    d = _section(raw, "backend")
    _check_keys(d, "backend", ("type", "timeout", "attempts", "localfs", "memory", "registry",
                               "s3", "dragonfly"), reserved=True)
    if d.get("type") is None:
        raise ConfigError("backend.type: required (e.g. localfs)")
    kind = d["type"]
    if not isinstance(kind, str):
        raise ConfigError(f"backend.type: expected a backend name, got {kind!r}")
    check_backend_type(kind, "backend.type")
    kw: dict[str, object] = {"type": kind}
    if "timeout" in d:
        kw["timeout"] = _seconds(d["timeout"], "backend.timeout", positive=True)
    if "attempts" in d:
        kw["attempts"] = _int(d["attempts"], "backend.attempts", minimum=1)
    if "localfs" in d:
        block = _section(d["localfs"], "backend.localfs")
        _check_keys(block, "backend.localfs", ("dir",))
        dir_ = block.get("dir")
        kw["localfs"] = LocalFsConfig(
            dir=None if dir_ is None else _path(dir_, "backend.localfs.dir", base_dir))
    if "memory" in d:
        block = _section(d["memory"], "backend.memory")
        _check_keys(block, "backend.memory", ("blobs",))
        blobs = _section(block.get("blobs"), "backend.memory.blobs")
        out: dict[str, bytes] = {}
        for name, value in blobs.items():
            if isinstance(value, str):
                value = value.encode()
            if not isinstance(value, bytes):
                raise ConfigError(f"backend.memory.blobs.{name}: expected bytes or a string")
            out[name] = value
        kw["memory"] = MemoryConfig(blobs=out)
    if "registry" in d:
        kw["registry"] = _registry(d["registry"], base_dir)
    if "s3" in d:
        kw["s3"] = _s3(d["s3"], base_dir)
    if "dragonfly" in d:
        kw["dragonfly"] = _dragonfly(d["dragonfly"], base_dir)
    if kind == "dragonfly":
        df = kw.get("dragonfly")
        if isinstance(df, DragonflyConfig) and df.fallback == "s3":
            s3 = kw.get("s3")
            if not isinstance(s3, S3Config) or not s3.bucket:
                raise ConfigError("backend.s3.bucket: required for the dragonfly fallback s3")
    if kind == "s3":
        s3 = kw.get("s3")
        if not isinstance(s3, S3Config) or not s3.bucket:
            raise ConfigError("backend.s3.bucket: required for backend s3")
    return BackendConfig(**kw)  # type: ignore[arg-type]


def _dragonfly(raw: object, base_dir: Path) -> DragonflyConfig:
    where = "backend.dragonfly"
    d = _section(raw, where)
    _check_keys(d, where, ("socket", "fallback", "timeout", "retry_after"))
    kw: dict[str, object] = {}
    if d.get("socket") is not None:
        kw["socket"] = _path(d["socket"], f"{where}.socket", base_dir)
    if d.get("fallback") is not None:
        fallback = d["fallback"]
        if fallback not in DRAGONFLY_FALLBACKS:
            raise ConfigError(f"{where}.fallback: expected one of "
                              f"{', '.join(DRAGONFLY_FALLBACKS)}, got {_show(fallback)}")
        kw["fallback"] = fallback
    for key in ("timeout", "retry_after"):
        if key in d:
            kw[key] = _seconds(d[key], f"{where}.{key}", positive=True)
    return DragonflyConfig(**kw)  # type: ignore[arg-type]


def _registry(raw: object, base_dir: Path) -> RegistryConfig:
    where = "backend.registry"
    d = _section(raw, where)
    _check_keys(d, where, ("host", "repository", "plain_http", "insecure_skip_verify",
                           "ca_file", "auth_file", "username", "password"))
    kw: dict[str, object] = {}
    for key in ("host", "repository", "username", "password"):
        if d.get(key) is not None:
            kw[key] = _str(d[key], f"{where}.{key}")
    if d.get("plain_http") is not None:
        kw["plain_http"] = _bool(d["plain_http"], f"{where}.plain_http")
    if "insecure_skip_verify" in d:
        kw["insecure_skip_verify"] = _bool(d["insecure_skip_verify"],
                                           f"{where}.insecure_skip_verify")
    for key in ("ca_file", "auth_file"):
        if d.get(key) is not None:
            kw[key] = _path(d[key], f"{where}.{key}", base_dir)
    if ("username" in kw) != ("password" in kw):
        raise ConfigError(f"{where}.password: username and password go together")
    return RegistryConfig(**kw)  # type: ignore[arg-type]


def _s3(raw: object, base_dir: Path) -> S3Config:
    where = "backend.s3"
    d = _section(raw, where)
    _check_keys(d, where, ("bucket", "endpoint", "region", "prefix", "access_key_id",
                           "secret_access_key", "session_token", "addressing",
                           "insecure_skip_verify", "ca_file"))
    kw: dict[str, object] = {}
    for key in ("bucket", "endpoint", "region", "access_key_id", "secret_access_key",
                "session_token"):
        if d.get(key) is not None:
            kw[key] = _str(d[key], f"{where}.{key}")
    if d.get("prefix") is not None:
        prefix = d["prefix"]
        if not isinstance(prefix, str):
            raise ConfigError(f"{where}.prefix: expected a string, got {_show(prefix)}")
        kw["prefix"] = prefix.strip("/")
    if d.get("endpoint") is not None and not str(kw["endpoint"]).startswith(
            ("http://", "https://")):
        raise ConfigError(f"{where}.endpoint: expected an http:// or https:// URL, "
                          f"got {kw['endpoint']!r}")
    if d.get("addressing") is not None:
        mode = d["addressing"]
        if mode not in ("path", "virtual"):
            raise ConfigError(f"{where}.addressing: expected path or virtual, got {_show(mode)}")
        kw["addressing"] = mode
    if "insecure_skip_verify" in d:
        kw["insecure_skip_verify"] = _bool(d["insecure_skip_verify"],
                                           f"{where}.insecure_skip_verify")
    if d.get("ca_file") is not None:
        kw["ca_file"] = _path(d["ca_file"], f"{where}.ca_file", base_dir)
    if ("access_key_id" in kw) != ("secret_access_key" in kw):
        raise ConfigError(f"{where}.secret_access_key: access_key_id and secret_access_key "
                          "go together")
    return S3Config(**kw)  # type: ignore[arg-type]


def _cache(raw: object, base_dir: Path) -> CacheConfig:
    d = _section(raw, "cache")
    _check_keys(d, "cache", ("enabled", "dir", "quota"))
    kw: dict[str, object] = {}
    if d.get("enabled") is not None:
        kw["enabled"] = _bool(d["enabled"], "cache.enabled")
    if "dir" in d:
        kw["dir"] = _path(d["dir"], "cache.dir", base_dir)
    if "quota" in d:
        kw["quota"] = _size(d["quota"], "cache.quota", minimum=1)
    return CacheConfig(**kw)  # type: ignore[arg-type]


def _prefetch(raw: object) -> PrefetchConfig:
    d = _section(raw, "prefetch")
    _check_keys(d, "prefetch", ("all", "bandwidth", "concurrency"))
    kw: dict[str, object] = {}
    if "all" in d:
        kw["all"] = _bool(d["all"], "prefetch.all")
    if "bandwidth" in d:
        kw["bandwidth"] = _size(d["bandwidth"], "prefetch.bandwidth", minimum=0, rate=True)
    if "concurrency" in d:
        kw["concurrency"] = _int(d["concurrency"], "prefetch.concurrency", minimum=1)
    return PrefetchConfig(**kw)  # type: ignore[arg-type]


def _fuse(raw: object) -> FuseConfig:
    d = _section(raw, "fuse")
    _check_keys(d, "fuse", ("allow_other", "entry_timeout", "attr_timeout"))
    kw: dict[str, object] = {}
    if "allow_other" in d:
        kw["allow_other"] = _bool(d["allow_other"], "fuse.allow_other")
    for key in ("entry_timeout", "attr_timeout"):
        if key in d:
            kw[key] = _seconds(d[key], f"fuse.{key}", positive=False)
    return FuseConfig(**kw)  # type: ignore[arg-type]


def _read(raw: object) -> ReadConfig:
    d = _section(raw, "read")
    _check_keys(d, "read", ("merge_window", "cache_chunks", "readahead_chunks",
                            "bootstrap_memory"))
    kw: dict[str, object] = {}
    for key in ("merge_window", "cache_chunks", "bootstrap_memory"):
        if key in d:
            kw[key] = _size(d[key], f"read.{key}", minimum=0)
    if "readahead_chunks" in d:
        kw["readahead_chunks"] = _int(d["readahead_chunks"], "read.readahead_chunks", minimum=0)
    return ReadConfig(**kw)  # type: ignore[arg-type]


# -- values -------------------------------------------------------------------------------

def _section(raw: object, where: str) -> dict[str, object]:
    """A mapping with string keys; ``None`` (an empty YAML section) is an empty one."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or '<config>'}: expected a mapping, got {_show(raw)}")
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(f"{_join(where, str(key))}: keys must be strings")
    return dict(raw)


def _check_keys(d: Mapping[str, object], where: str, allowed: tuple[str, ...], *,
                reserved: bool = False) -> None:
    unknown = sorted(set(d) - set(allowed))
    if not unknown:
        return
    if reserved and unknown[0] in RESERVED_BACKENDS:  # a block for a backend still to come
        check_backend_type(unknown[0], _join(where, unknown[0]))
    keys = ", ".join(_join(where, k) for k in unknown)
    noun = "key" if len(unknown) == 1 else "keys"
    raise ConfigError(f"{keys}: unknown {noun} (known: {', '.join(allowed)})")


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {_show(value)}")
    return value


def _str(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string, got {_show(value)}")
    return value


def _int(value: object, where: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
    if value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}, got {value}")
    return value


def _size(value: object, where: str, *, minimum: int, rate: bool = False) -> int:
    """Bytes as an integer or a string with a binary unit: ``65536``, ``512KiB``, ``10G``."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{where}: expected a size like 512MiB, got {_show(value)}")
    if isinstance(value, str):
        text = value.strip()
        if rate and text.lower().endswith("/s"):  # "10MiB/s" reads naturally for bandwidth
            text = text[:-2]
        # Imported here: the builder package is heavy and a mount (which loads a config on a
        # container's start path) needs nothing else from it.
        from nydusfs.builder.chunker import parse_size

        try:
            value = parse_size(text)
        except BuildError:
            raise ConfigError(f"{where}: invalid size {value!r} "
                              "(examples: 65536, 512KiB, 10GiB)") from None
    if value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}, got {value}")
    return value


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(value: object, where: str, *, positive: bool) -> float:
    """Seconds as a number or a string with a unit: ``30``, ``0.5``, ``250ms``, ``5m``, ``1h``."""
    seconds: float
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{where}: expected a duration like 30s, got {_show(value)}")
    if isinstance(value, str):
        m = _DURATION.fullmatch(value)
        if not m:
            raise ConfigError(f"{where}: invalid duration {value!r} (examples: 30, 250ms, 5m)")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        raise ConfigError(f"{where}: must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return seconds


def _path(value: object, where: str, base_dir: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty path, got {_show(value)}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def _host_port(value: object, where: str) -> HostPort:
    """``HOST:PORT``; IPv6 hosts in brackets (``[::1]:9100``)."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected HOST:PORT, got {_show(value)}")
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{where}: expected HOST:PORT (e.g. 127.0.0.1:9100), got {value!r}")
    return HostPort(host, int(port))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _show(value: object) -> str:
    return f"{type(value).__name__} {value!r}"
