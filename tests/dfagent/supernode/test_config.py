"""Supernode config: defaults, units, and errors that name the field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dfagent.errors import ConfigError
from dfagent.supernode.config import SupernodeConfig, load_config, parse_config
from nydusfs.config import HostPort

TOKEN = "0123456789abcdef-token"


def test_defaults() -> None:
    cfg = load_config(None)
    assert cfg == SupernodeConfig()
    assert cfg.listen == HostPort("127.0.0.1", 8001)
    assert (cfg.store.type, cfg.peer_ttl, cfg.k, cfg.token, cfg.tls) == \
        ("memory", 30.0, 4, None, None)
    assert cfg.sweep_every == 7.5
    assert parse_config(None, base_dir=Path()) == cfg


def test_full_config_with_units(tmp_config: Callable[[str], Path], tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    path = tmp_config(f"""
listen: 0.0.0.0:9001
store: {{type: redis, url: "redis://10.0.0.5:6379/2", prefix: "c1:", max_connections: 8,
        timeout: 500ms}}
peer_ttl: 1m
sweep_interval: 5s
quarantine: {{reports: 2, window: 2m, duration: 1h}}
k: 6
leases: {{ttl: 3s, per_peer: 32, bytes: 2MiB}}
token_file: {tmp_path / "token"}
tls: {{cert: tls.crt, key: tls.key}}
""")
    cfg = load_config(path)
    assert cfg.listen == HostPort("0.0.0.0", 9001)
    assert (cfg.store.type, cfg.store.url, cfg.store.prefix, cfg.store.max_connections,
            cfg.store.timeout) == ("redis", "redis://10.0.0.5:6379/2", "c1:", 8, 0.5)
    assert (cfg.peer_ttl, cfg.sweep_every, cfg.k, cfg.token) == (60.0, 5.0, 6, TOKEN)
    assert (cfg.quarantine.reports, cfg.quarantine.window, cfg.quarantine.duration) == \
        (2, 120.0, 3600.0)
    assert (cfg.leases.ttl, cfg.leases.per_peer, cfg.leases.bytes) == (3.0, 32, 2 << 20)
    assert cfg.tls is not None and cfg.tls.cert == path.parent / "tls.crt"


@pytest.mark.parametrize(("doc", "message"), [
    ({"listn": "1.2.3.4:5"}, r"^listn: unknown key"),
    ({"listen": "nowhere"}, r"^listen: expected HOST:PORT"),
    ({"store": "etcd"}, r"^store: unknown store 'etcd' \(known: memory, redis\)"),
    ({"store": "redis"}, r"^store: the redis store needs a url"),
    ({"store": {"type": "redis"}}, r"^store\.url: required"),
    ({"store": {"type": "redis", "url": "http://x"}}, r"^store\.url: expected a redis://"),
    ({"store": {"type": "memory", "url": "redis://x"}}, r"^store\.url: only for the redis"),
    ({"store": {"url": "redis://x"}}, r"^store\.type: required"),
    ({"store": {"type": "redis", "url": "redis://x", "max_connections": 0}},
     r"^store\.max_connections: must be >= 1"),
    ({"peer_ttl": "soon"}, r"^peer_ttl: invalid duration"),
    ({"peer_ttl": 0}, r"^peer_ttl: must be > 0"),
    ({"quarantine": {"reports": 0}}, r"^quarantine\.reports: must be >= 1"),
    ({"quarantine": {"window": "5 min"}}, r"^quarantine\.window: invalid duration"),
    ({"quarantine": {"length": 3}}, r"^quarantine\.length: unknown key"),
    ({"k": 0}, r"^k: must be >= 1"),
    ({"leases": {"bytes": "lots"}}, r"^leases\.bytes: "),
    ({"k": 65}, r"^k: at most 64"),
    ({"token": "short"}, r"^token: too short"),
    ({"token": "has a space in it, long"}, r"^token: must be printable ASCII"),
    ({"token": TOKEN, "token_file": "/x"}, r"^token_file: give token or token_file"),
    ({"token_file": "/nonexistent/token"}, r"^token_file: cannot read"),
    ({"tls": {"cert": "a.crt"}}, r"^tls\.key: required"),
    ([1, 2], r"^<config>: expected a mapping"),
])
def test_errors_name_the_field(doc: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(doc, base_dir=Path("/etc"))


def test_file_errors(tmp_config: Callable[[str], Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_config("listen: [unclosed"))
