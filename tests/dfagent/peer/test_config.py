"""The peer agent config: defaults, units, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from dfagent.errors import ConfigError
from dfagent.peer.config import PeerConfig, parse_config


def test_defaults_and_units(tmp_path: Path) -> None:
    assert parse_config(None, base_dir=tmp_path) == PeerConfig()
    cfg = parse_config({
        "id": "node-1", "supernodes": ["http://sn1:8001/", "https://sn2:8001"],
        "listen": "127.0.0.1:0", "advertise": "http://10.0.0.7:8002", "socket": "a.sock",
        "data_dir": "data", "quota": "512MiB", "upload": {"max_concurrent": 2, "rate": "10MiB/s",
                                                       "memory": "8MiB"},
        "zone": "rack-1", "token": "t" * 20, "metrics": "127.0.0.1:9102",
        "fetch": {"lookup_timeout": "250ms", "k": 3},
        "source": {"timeout": "5s", "registry": {"username": "u", "password": "p"},
                   "s3": {"access_key_id": "k", "secret_access_key": "s"}}}, base_dir=tmp_path)
    assert cfg.supernodes == ("http://sn1:8001", "https://sn2:8001")
    assert cfg.socket == tmp_path / "a.sock" and cfg.data_dir == tmp_path / "data"
    assert cfg.quota == 512 << 20 and cfg.upload.rate == 10 << 20
    assert cfg.upload.memory == 8 << 20 and PeerConfig().upload.memory == 64 << 20
    assert cfg.fetch.lookup_timeout == 0.25 and cfg.fetch.k == 3
    assert cfg.peer_id(8002) == "node-1" and cfg.advertise_url(1) == "http://10.0.0.7:8002"
    assert parse_config({"listen": "127.0.0.1:0"}, base_dir=tmp_path).advertise_url(9) == \
        "http://127.0.0.1:9"


@pytest.mark.parametrize("doc, message", [
    ({"quota": "12Q"}, "quota: invalid size '12Q'"),
    ({"supernodes": ["sn:8001"]}, "supernodes[0]: expected an http:// or https:// URL"),
    ({"upload": {"max_concurrent": 0}}, "upload.max_concurrent: must be >= 1"),
    ({"upload": {"speed": 1}}, "upload.speed: unknown key"),
    ({"upload": {"memory": "-1MiB"}}, "upload.memory: invalid size"),
    ({"token": "short"}, "token: too short"),
    ({"id": "bad id"}, "id: expected a peer id"),
    ({"advertise": "10.0.0.7:8002"}, "advertise: expected a URL"),
    ({"fetch": {"k": 100}}, "fetch.k: at most 64"),
    ({"source": {"registry": {"username": "u"}}},
     "source.registry.password: username and password go together"),
    ({"metrics": "nope"}, "metrics: expected HOST:PORT"),
    ({"peers": []}, "peers: unknown key"),
])
def test_errors_name_their_field(doc: object, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base_dir=tmp_path)
    assert str(info.value).startswith(message), str(info.value)
