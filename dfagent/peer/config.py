"""The peer agent configuration: typed dataclasses, loaded once at the edge from YAML.

``dfagent peer --config FILE`` calls :func:`load_config`; everything below receives a
:class:`PeerConfig`. Defaults live on the dataclass fields (docs/dfagent.md mirrors them).
Values are validated with nydusfs's config helpers, so sizes (``512MiB``), rates
(``100MiB/s``), durations (``250ms``) and ``HOST:PORT`` read the same in every dfnydus config,
and every :class:`~nydusfs.errors.ConfigError` starts with the field's dotted path. Unknown
keys are errors. Relative paths are resolved against the config file's directory.

Example (every key optional; with no ``supernodes`` the agent is a caching proxy to sources)::

    id: node-7                          # default: <hostname>-<listen port>
    supernodes: [http://10.0.0.5:8001, http://10.0.0.6:8001]
    listen: 0.0.0.0:8002                # upload server (other peers fetch from it)
    advertise: http://10.0.0.7:8002     # how other peers reach it; default from listen
    socket: /run/dfagent/dfagent.sock   # local API for nydusfs (backend: dragonfly)
    data_dir: /var/lib/dfagent
    quota: 10GiB
    upload: {max_concurrent: 8, rate: 100MiB/s}
    zone: rack-3
    token_file: /etc/dfagent/token      # or token: "...": cluster token (peers + supernode)
    metrics: 127.0.0.1:9102
    fetch: {lookup_timeout: 2s, peer_timeout: 10s, hedge_after: 2s, k: 4, batch: 16,
            lease_wait: 4s}
    source:
      timeout: 30s
      attempts: 3
      registry: {auth_file: /root/.docker/config.json}      # or username/password
      s3: {access_key_id: ..., secret_access_key: ...}
"""

from __future__ import annotations

import re
import socket as socket_module
from dataclasses import dataclass, field
from pathlib import Path

from dfagent.errors import ConfigError, RequestError
from nydusfs.config import (
    DEFAULT_DRAGONFLY_SOCKET,
    HostPort,
    _check_keys,
    _host_port,
    _int,
    _path,
    _seconds,
    _section,
    _show,
    _size,
    _str,
    read_yaml,
)

__all__ = [
    "DEFAULT_DATA_DIR",
    "FetchConfig",
    "PeerConfig",
    "RegistryCredentials",
    "S3Credentials",
    "SourceConfig",
    "UploadConfig",
    "load_config",
    "parse_config",
]

DEFAULT_DATA_DIR = Path("/var/lib/dfagent")
DEFAULT_LISTEN = HostPort("0.0.0.0", 8002)
_ID_BAD = re.compile(r"[^A-Za-z0-9._:@-]")


@dataclass(frozen=True, slots=True)
class UploadConfig:
    max_concurrent: int = 32  # uploads served at once; more get 429 at once
    rate: int = 0  # bytes per second for all uploads together; 0 = unlimited
    memory: int = 64 << 20  # bytes of the latest stored chunks kept in memory to serve from


@dataclass(frozen=True, slots=True)
class FetchConfig:
    lookup_timeout: float = 2.0  # seconds for a supernode lookup; then go to the source
    peer_timeout: float = 10.0  # seconds a request to one peer may go without progress (bytes)
    hedge_after: float = 2.0  # seconds before a slow peer's chunks are also asked elsewhere
    k: int = 4  # peers asked for per chunk (ranked by the supernode)
    batch: int = 16  # chunks per request to one peer
    concurrency: int = 8  # batches in flight (peers and source together)
    lease_wait: float = 4.0  # seconds a fetch waits on peers with nothing arriving (x3 in all)


@dataclass(frozen=True, slots=True)
class RegistryCredentials:
    """The node's registry credentials, used for every registry source it fetches from."""

    auth_file: Path | None = None  # docker-style config.json; None: the usual places
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class S3Credentials:
    """The node's S3 keys; unset ones come from ``AWS_*`` variables (none: unsigned)."""

    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class SourceConfig:
    timeout: float = 30.0  # seconds per source attempt
    attempts: int = 3  # tries per source read (transient failures)
    registry: RegistryCredentials = field(default_factory=RegistryCredentials)
    s3: S3Credentials = field(default_factory=S3Credentials)


@dataclass(frozen=True, slots=True)
class PeerConfig:
    id: str | None = None  # None: "<hostname>-<listen port>"
    supernodes: tuple[str, ...] = ()
    listen: HostPort = DEFAULT_LISTEN  # port 0: any free port (logged at start)
    advertise: str | None = None  # None: http://<listen host or hostname>:<port>
    socket: Path = DEFAULT_DRAGONFLY_SOCKET
    data_dir: Path = DEFAULT_DATA_DIR
    quota: int = 10 << 30  # bytes of chunk files kept; LRU eviction above it
    upload: UploadConfig = field(default_factory=UploadConfig)
    zone: str = ""
    token: str | None = None
    metrics: HostPort | None = None
    fetch: FetchConfig = field(default_factory=FetchConfig)
    source: SourceConfig = field(default_factory=SourceConfig)

    def peer_id(self, port: int) -> str:
        if self.id is not None:
            return self.id
        host = _ID_BAD.sub("-", socket_module.gethostname()) or "peer"
        return f"{host.lstrip('.-_:@') or 'peer'}-{port}"[:128]

    def advertise_url(self, port: int) -> str:
        if self.advertise is not None:
            return self.advertise
        host = self.listen.host
        if host in ("0.0.0.0", "::", ""):
            host = socket_module.gethostname()
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"


def load_config(path: Path | str | None) -> PeerConfig:
    """Read and validate a peer config file; ``None`` gives every default."""
    if path is None:
        return PeerConfig()
    path = Path(path)
    return parse_config(read_yaml(path), base_dir=path.parent)


_TOP = ("id", "supernodes", "listen", "advertise", "socket", "data_dir", "quota", "upload",
        "zone", "token", "token_file", "metrics", "fetch", "source")


def parse_config(raw: object, *, base_dir: Path) -> PeerConfig:
    """Validate an already-parsed document (``None`` = empty); relative paths join ``base_dir``."""
    from dfagent.supernode.config import cluster_token
    from dfagent.supernode.model import check_peer_id, parse_address, parse_zone

    doc = _section(raw, "")
    _check_keys(doc, "", _TOP)
    kw: dict[str, object] = {}
    try:
        if doc.get("id") is not None:
            kw["id"] = check_peer_id(doc["id"], "id")
        if doc.get("advertise") is not None:
            kw["advertise"] = parse_address(doc["advertise"], "advertise")
        if doc.get("zone") is not None:
            kw["zone"] = parse_zone(doc["zone"], "zone")
    except RequestError as exc:  # the same check as the supernode's, a config error here
        raise ConfigError(str(exc)) from exc
    if doc.get("supernodes") is not None:
        kw["supernodes"] = _supernodes(doc["supernodes"])
    if doc.get("listen") is not None:
        kw["listen"] = _host_port(doc["listen"], "listen")
    for key in ("socket", "data_dir"):
        if doc.get(key) is not None:
            kw[key] = _path(doc[key], key, base_dir)
    if "quota" in doc:
        kw["quota"] = _size(doc["quota"], "quota", minimum=1)
    if "upload" in doc:
        d = _section(doc["upload"], "upload")
        _check_keys(d, "upload", ("max_concurrent", "rate", "memory"))
        up: dict[str, object] = {}
        if "max_concurrent" in d:
            up["max_concurrent"] = _int(d["max_concurrent"], "upload.max_concurrent", minimum=1)
        if "rate" in d:
            up["rate"] = _size(d["rate"], "upload.rate", minimum=0, rate=True)
        if "memory" in d:
            up["memory"] = _size(d["memory"], "upload.memory", minimum=0)
        kw["upload"] = UploadConfig(**up)  # type: ignore[arg-type]
    token = cluster_token(doc, base_dir)
    if token is not None:
        kw["token"] = token
    if doc.get("metrics") is not None:
        kw["metrics"] = _host_port(doc["metrics"], "metrics")
    if "fetch" in doc:
        kw["fetch"] = _fetch(doc["fetch"])
    if "source" in doc:
        kw["source"] = _source(doc["source"], base_dir)
    return PeerConfig(**kw)  # type: ignore[arg-type]  # keys and types checked above


def _supernodes(raw: object) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise ConfigError(f"supernodes: expected a list of URLs, got {_show(raw)}")
    out = []
    for i, url in enumerate(raw):
        text = _str(url, f"supernodes[{i}]")
        if not text.startswith(("http://", "https://")):
            raise ConfigError(f"supernodes[{i}]: expected an http:// or https:// URL, "
                              f"got {text!r}")
        out.append(text.rstrip("/"))
    return tuple(out)


def _fetch(raw: object) -> FetchConfig:
    d = _section(raw, "fetch")
    _check_keys(d, "fetch", ("lookup_timeout", "peer_timeout", "hedge_after", "k", "batch",
                             "concurrency", "lease_wait"))
    kw: dict[str, object] = {}
    for key in ("lookup_timeout", "peer_timeout", "hedge_after", "lease_wait"):
        if key in d:
            kw[key] = _seconds(d[key], f"fetch.{key}", positive=True)
    for key, top in (("k", 64), ("batch", 256), ("concurrency", 1024)):
        if key in d:
            value = _int(d[key], f"fetch.{key}", minimum=1)
            if value > top:
                raise ConfigError(f"fetch.{key}: at most {top}, got {value}")
            kw[key] = value
    return FetchConfig(**kw)  # type: ignore[arg-type]


def _source(raw: object, base_dir: Path) -> SourceConfig:
    d = _section(raw, "source")
    _check_keys(d, "source", ("timeout", "attempts", "registry", "s3"))
    kw: dict[str, object] = {}
    if "timeout" in d:
        kw["timeout"] = _seconds(d["timeout"], "source.timeout", positive=True)
    if "attempts" in d:
        kw["attempts"] = _int(d["attempts"], "source.attempts", minimum=1)
    if "registry" in d:
        r = _section(d["registry"], "source.registry")
        _check_keys(r, "source.registry", ("auth_file", "username", "password", "ca_file"))
        rk: dict[str, object] = {}
        for key in ("auth_file", "ca_file"):
            if r.get(key) is not None:
                rk[key] = _path(r[key], f"source.registry.{key}", base_dir)
        for key in ("username", "password"):
            if r.get(key) is not None:
                rk[key] = _str(r[key], f"source.registry.{key}")
        if ("username" in rk) != ("password" in rk):
            raise ConfigError("source.registry.password: username and password go together")
        kw["registry"] = RegistryCredentials(**rk)  # type: ignore[arg-type]
    if "s3" in d:
        s = _section(d["s3"], "source.s3")
        _check_keys(s, "source.s3", ("access_key_id", "secret_access_key", "session_token",
                                     "ca_file"))
        sk: dict[str, object] = {}
        for key in ("access_key_id", "secret_access_key", "session_token"):
            if s.get(key) is not None:
                sk[key] = _str(s[key], f"source.s3.{key}")
        if s.get("ca_file") is not None:
            sk["ca_file"] = _path(s["ca_file"], "source.s3.ca_file", base_dir)
        if ("access_key_id" in sk) != ("secret_access_key" in sk):
            raise ConfigError("source.s3.secret_access_key: access_key_id and "
                              "secret_access_key go together")
        kw["s3"] = S3Credentials(**sk)  # type: ignore[arg-type]
    return SourceConfig(**kw)  # type: ignore[arg-type]
