"""The supernode configuration: typed dataclasses, loaded once at the edge from YAML.

``dfagent supernode --config FILE`` calls :func:`load_config`; the server and scheduler receive a
:class:`SupernodeConfig` and never see raw YAML. Defaults live on the dataclass fields
(docs/dfagent.md mirrors them). Validation uses nydusfs's config value helpers, so sizes,
durations and ``HOST:PORT`` read the same in every dfnydus config, and every
:class:`~nydusfs.errors.ConfigError` starts with the field's dotted path
(``quarantine.window: invalid duration '5 min'``). Unknown keys are errors.

Example (every key optional)::

    listen: 0.0.0.0:8001
    store: {type: redis, url: redis://10.0.0.5:6379/0}   # or: store: memory
    peer_ttl: 30s
    quarantine: {reports: 3, window: 5m, duration: 10m}
    k: 4
    leases: {ttl: 10s, per_peer: 4096, bytes: 4MiB}
    token_file: /etc/dfagent/token          # or token: "..."
    tls: {cert: /etc/dfagent/tls.crt, key: /etc/dfagent/tls.key}

Relative paths are resolved against the directory of the config file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dfagent.errors import ConfigError
from dfagent.supernode.model import MAX_K
from nydusfs.config import (
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
    "STORE_TYPES",
    "LeaseConfig",
    "QuarantineConfig",
    "StoreConfig",
    "SupernodeConfig",
    "TlsConfig",
    "cluster_token",
    "load_config",
    "parse_config",
]

STORE_TYPES = ("memory", "redis")
DEFAULT_LISTEN = HostPort("127.0.0.1", 8001)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    type: str = "memory"
    url: str | None = None  # redis: redis://[user:pass@]host:port/db, rediss://..., unix://...
    prefix: str = "dfagent:sn:"  # redis: key prefix; replicas of one cluster share it
    max_connections: int = 32  # redis: connection pool size (a blocking pool)
    timeout: float = 2.0  # redis: seconds per command (and to wait for a free connection)


@dataclass(frozen=True, slots=True)
class QuarantineConfig:
    reports: int = 3  # distinct reporters within `window` that quarantine a peer
    window: float = 300.0  # seconds
    duration: float = 600.0  # seconds a quarantined peer is left out of lookups


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    """Source leases (docs/dfagent.md, "Source leases"): who fetches a chunk nobody holds."""

    ttl: float = 10.0  # seconds a lease lasts unless its holder announces the chunk first
    # Live leases one peer may hold at once: a bound on state, not what spreads the fetching
    # (``bytes`` does). It was 256: in regions of tiny chunks (a few MB in thousands of files)
    # that kept each node's source reads to a few hundred KB and the source link idle.
    per_peer: int = 4096
    bytes: int = 4 << 20  # source bytes one peer may hold leases for (0: no byte limit)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class SupernodeConfig:
    listen: HostPort = DEFAULT_LISTEN  # port 0: any free port (logged at start)
    store: StoreConfig = field(default_factory=StoreConfig)
    peer_ttl: float = 30.0  # seconds without a heartbeat before a peer and its chunks expire
    sweep_interval: float | None = None  # seconds between expiry sweeps; None: peer_ttl / 4
    quarantine: QuarantineConfig = field(default_factory=QuarantineConfig)
    k: int = 4  # peers per digest in a lookup answer when the request does not say
    leases: LeaseConfig = field(default_factory=LeaseConfig)
    token: str | None = None  # cluster token: every /api/v1 call must send it as a Bearer
    tls: TlsConfig | None = None  # serve HTTPS with this certificate and key

    @property
    def sweep_every(self) -> float:
        return self.sweep_interval if self.sweep_interval is not None else self.peer_ttl / 4


def load_config(path: Path | str | None) -> SupernodeConfig:
    """Read and validate a supernode config file; ``None`` gives every default."""
    if path is None:
        return SupernodeConfig()
    path = Path(path)
    return parse_config(read_yaml(path), base_dir=path.parent)


def parse_config(raw: object, *, base_dir: Path) -> SupernodeConfig:
    """Validate an already-parsed document (``None`` = empty); relative paths join ``base_dir``."""
    doc = _section(raw, "")
    _check_keys(doc, "", ("listen", "store", "peer_ttl", "sweep_interval", "quarantine", "k",
                          "leases", "token", "token_file", "tls"))
    kw: dict[str, object] = {}
    if doc.get("listen") is not None:
        kw["listen"] = _host_port(doc["listen"], "listen")
    if "store" in doc:
        kw["store"] = _store(doc["store"])
    if "peer_ttl" in doc:
        kw["peer_ttl"] = _seconds(doc["peer_ttl"], "peer_ttl", positive=True)
    if doc.get("sweep_interval") is not None:
        kw["sweep_interval"] = _seconds(doc["sweep_interval"], "sweep_interval", positive=True)
    if "quarantine" in doc:
        kw["quarantine"] = _quarantine(doc["quarantine"])
    if "k" in doc:
        kw["k"] = _int(doc["k"], "k", minimum=1)
        if kw["k"] > MAX_K:  # type: ignore[operator]  # an int, checked just above
            raise ConfigError(f"k: at most {MAX_K}, got {kw['k']}")
    if "leases" in doc:
        kw["leases"] = _leases(doc["leases"])
    token = cluster_token(doc, base_dir)
    if token is not None:
        kw["token"] = token
    if doc.get("tls") is not None:
        tls = _section(doc["tls"], "tls")
        _check_keys(tls, "tls", ("cert", "key"))
        for key in ("cert", "key"):
            if tls.get(key) is None:
                raise ConfigError(f"tls.{key}: required with tls (cert and key go together)")
        kw["tls"] = TlsConfig(cert=_path(tls["cert"], "tls.cert", base_dir),
                              key=_path(tls["key"], "tls.key", base_dir))
    return SupernodeConfig(**kw)  # type: ignore[arg-type]  # keys and types checked above


def cluster_token(doc: dict[str, object], base_dir: Path) -> str | None:
    """The cluster token of a supernode or peer config: ``token`` or ``token_file`` (not
    both; the file's text stripped); ``None`` when neither is set. Printable ASCII without
    spaces, at least 16 characters."""
    if doc.get("token") is not None and doc.get("token_file") is not None:
        raise ConfigError("token_file: give token or token_file, not both")
    if doc.get("token") is not None:
        return _token(doc["token"], "token")
    if doc.get("token_file") is None:
        return None
    tpath = _path(doc["token_file"], "token_file", base_dir)
    try:
        text = tpath.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"token_file: cannot read {tpath}: {exc}") from exc
    return _token(text.strip(), "token_file")


def _token(value: object, where: str) -> str:
    token = _str(value, where)
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(f"{where}: must be printable ASCII without spaces")
    if len(token) < 16:
        raise ConfigError(f"{where}: too short ({len(token)} characters; use at least 16)")
    return token


def _store(raw: object) -> StoreConfig:
    if isinstance(raw, str):
        _store_type(raw, "store")
        if raw == "redis":
            raise ConfigError("store: the redis store needs a url "
                              "(store: {type: redis, url: redis://HOST:6379/0})")
        return StoreConfig(type=raw)
    d = _section(raw, "store")
    _check_keys(d, "store", ("type", "url", "prefix", "max_connections", "timeout"))
    if d.get("type") is None:
        raise ConfigError(f"store.type: required (one of {', '.join(STORE_TYPES)})")
    kind = _store_type(d["type"], "store.type")
    kw: dict[str, object] = {"type": kind}
    if kind == "memory":
        extra = sorted(set(d) - {"type"})
        if extra:
            raise ConfigError(f"store.{extra[0]}: only for the redis store")
        return StoreConfig(**kw)  # type: ignore[arg-type]
    if d.get("url") is None:
        raise ConfigError("store.url: required for the redis store (e.g. redis://HOST:6379/0)")
    url = _str(d["url"], "store.url")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"store.url: expected a redis://, rediss:// or unix:// URL, "
                          f"got {url!r}")
    kw["url"] = url
    if "prefix" in d:
        kw["prefix"] = _str(d["prefix"], "store.prefix")
    if "max_connections" in d:
        kw["max_connections"] = _int(d["max_connections"], "store.max_connections", minimum=1)
    if "timeout" in d:
        kw["timeout"] = _seconds(d["timeout"], "store.timeout", positive=True)
    return StoreConfig(**kw)  # type: ignore[arg-type]


def _store_type(value: object, where: str) -> str:
    if value not in STORE_TYPES:
        shown = repr(value) if isinstance(value, str) else _show(value)
        raise ConfigError(f"{where}: unknown store {shown} "
                          f"(known: {', '.join(STORE_TYPES)})")
    return str(value)


def _quarantine(raw: object) -> QuarantineConfig:
    d = _section(raw, "quarantine")
    _check_keys(d, "quarantine", ("reports", "window", "duration"))
    kw: dict[str, object] = {}
    if "reports" in d:
        kw["reports"] = _int(d["reports"], "quarantine.reports", minimum=1)
    for key in ("window", "duration"):
        if key in d:
            kw[key] = _seconds(d[key], f"quarantine.{key}", positive=True)
    return QuarantineConfig(**kw)  # type: ignore[arg-type]


def _leases(raw: object) -> LeaseConfig:
    d = _section(raw, "leases")
    _check_keys(d, "leases", ("ttl", "per_peer", "bytes"))
    kw: dict[str, object] = {}
    if "ttl" in d:
        kw["ttl"] = _seconds(d["ttl"], "leases.ttl", positive=True)
    if "per_peer" in d:
        kw["per_peer"] = _int(d["per_peer"], "leases.per_peer", minimum=1)
    if "bytes" in d:
        kw["bytes"] = _size(d["bytes"], "leases.bytes", minimum=0)
    return LeaseConfig(**kw)  # type: ignore[arg-type]
