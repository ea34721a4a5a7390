"""Value types of the supernode and the validation of everything that enters it.

This is the bottom layer: no I/O, no aiohttp, no store. Both the server (validating request
bodies, where untrusted input enters) and the client (building requests, reading answers) use
these types, so both agree on one definition of a valid digest, peer id or address.

Every ``parse_*`` function takes decoded JSON (``object``) and either returns a typed value or
raises :class:`~dfagent.errors.RequestError` whose message starts with the field's path
(``digests[3]: expected 64 lowercase hex characters``), which the server returns as a 400.

Limits (also in docs/api.md) keep one request's cost bounded: a lookup of at most
:data:`MAX_LOOKUP` digests, an announce or withdraw of at most :data:`MAX_ANNOUNCE`; the client
splits bigger batches.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import yarl

from dfagent.errors import RequestError

__all__ = [
    "MAX_ANNOUNCE",
    "MAX_K",
    "MAX_LOOKUP",
    "REPORT_REASONS",
    "PeerInfo",
    "PeerLoad",
    "PeerState",
    "check_digest",
    "check_peer_id",
    "parse_address",
    "parse_body",
    "parse_digests",
    "parse_int",
    "parse_labels",
    "parse_peer_info",
    "parse_peer_load",
    "parse_zone",
]

MAX_LOOKUP = 1_000  # digests per lookup request
MAX_ANNOUNCE = 10_000  # digests per announce / withdraw request
MAX_K = 64  # peers per digest in a lookup answer
MAX_CAPACITY = 100_000  # concurrent uploads a peer may declare
MAX_LABELS = 16
REPORT_REASONS = ("corrupt", "timeout", "refused", "error")

_DIGEST = re.compile(r"[0-9a-f]{64}")
# Host names, UUIDs, pod names, "node-1:8002"; no spaces, slashes or control characters.
_PEER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_ZONE = re.compile(r"[A-Za-z0-9._/-]{0,63}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
_LABEL_VALUE_MAX = 256


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What a peer tells the supernode about itself when it registers.

    ``address`` is the base URL of its upload server as other peers must reach it
    (``http://10.0.0.7:8002``); ``capacity`` is the number of uploads it serves at once, used to
    turn its reported load into a fraction.
    """

    id: str
    address: str
    zone: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    capacity: int = 8

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "address": self.address, "zone": self.zone,
                "labels": dict(self.labels), "capacity": self.capacity}


@dataclass(frozen=True, slots=True)
class PeerLoad:
    """A peer's load, sent with each heartbeat: uploads in progress and free cache bytes."""

    active_uploads: int = 0
    free_cache: int = 0

    def to_json(self) -> dict[str, int]:
        return {"active_uploads": self.active_uploads, "free_cache": self.free_cache}


@dataclass(slots=True)
class PeerState:
    """A registered peer as a store holds it: who it is, its last load, and when it was seen.

    Times are seconds on the supernode's injected clock (wall-clock ``time.time()`` in
    production, so replicas sharing a Redis store agree on them).
    """

    info: PeerInfo
    load: PeerLoad
    registered_at: float
    last_seen: float

    @property
    def id(self) -> str:
        return self.info.id


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_digest(value: object, where: str) -> str:
    """A chunk digest: blake3, as 64 lowercase hex characters."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise RequestError(f"{where}: expected a blake3 digest (64 lowercase hex characters), "
                           f"got {_show(value)}")
    return value


def check_peer_id(value: object, where: str) -> str:
    if not isinstance(value, str) or not _PEER_ID.fullmatch(value):
        raise RequestError(f"{where}: expected a peer id (1-128 of A-Z a-z 0-9 . _ : @ -, "
                           f"starting with a letter or digit), got {_show(value)}")
    return value


def parse_digests(value: object, where: str, *, limit: int) -> list[str]:
    """A non-empty list of at most ``limit`` digests; duplicates are dropped, order kept."""
    if not isinstance(value, list):
        raise RequestError(f"{where}: expected a list of digests, got {_show(value)}")
    if not value:
        raise RequestError(f"{where}: must not be empty")
    if len(value) > limit:
        raise RequestError(f"{where}: at most {limit} digests per request, got {len(value)}")
    match = _DIGEST.fullmatch
    for i, d in enumerate(value):
        if not isinstance(d, str) or not match(d):
            check_digest(d, f"{where}[{i}]")
    return list(dict.fromkeys(value)) if len(set(value)) != len(value) else value


def parse_address(value: object, where: str) -> str:
    """An upload server's base URL: ``http(s)://HOST[:PORT]``, no path, query or credentials
    (without a port, the scheme's default)."""
    if not isinstance(value, str) or len(value) > 256:
        raise RequestError(f"{where}: expected a URL like http://10.0.0.7:8002, "
                           f"got {_show(value)}")
    try:
        url = yarl.URL(value)
        port = url.port
    except ValueError:
        url, port = None, None
    if (url is None or url.scheme not in ("http", "https") or not url.host or port is None
            or url.user is not None or url.password is not None or url.path not in ("", "/")
            or url.query_string or url.fragment):
        raise RequestError(f"{where}: expected a URL like http://10.0.0.7:8002 "
                           f"(http or https, host and port only), got {_show(value)}")
    return value.rstrip("/")


def parse_labels(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"{where}: expected a mapping of strings, got {_show(value)}")
    if len(value) > MAX_LABELS:
        raise RequestError(f"{where}: at most {MAX_LABELS} labels, got {len(value)}")
    for k, v in value.items():
        if not isinstance(k, str) or not _LABEL_KEY.fullmatch(k):
            raise RequestError(f"{where}: invalid label name {_show(k)}")
        if not isinstance(v, str) or len(v) > _LABEL_VALUE_MAX:
            raise RequestError(f"{where}.{k}: expected a string of at most "
                               f"{_LABEL_VALUE_MAX} characters, got {_show(v)}")
    return dict(value)


def parse_zone(value: object, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or not _ZONE.fullmatch(value):
        raise RequestError(f"{where}: expected a zone name (0-63 of A-Z a-z 0-9 . _ / -), "
                           f"got {_show(value)}")
    return value


def parse_int(value: object, where: str, *, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{where}: expected an integer, got {_show(value)}")
    if not minimum <= value <= maximum:
        raise RequestError(f"{where}: must be between {minimum} and {maximum}, got {value}")
    return value


def parse_body(value: object, allowed: tuple[str, ...], required: tuple[str, ...] = ()
               ) -> dict[str, object]:
    """A JSON object with only ``allowed`` keys and every ``required`` one."""
    if not isinstance(value, dict):
        raise RequestError(f"<body>: expected a JSON object, got {_show(value)}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise RequestError(f"{unknown[0]}: unknown field (known: {', '.join(allowed)})")
    for key in required:
        if key not in value:
            raise RequestError(f"{key}: required")
    return value


def parse_peer_info(peer_id: str, body: Mapping[str, object]) -> PeerInfo:
    """The registration fields of ``body`` (the id comes from the URL)."""
    return PeerInfo(
        id=peer_id,
        address=parse_address(body.get("address"), "address"),
        zone=parse_zone(body.get("zone"), "zone"),
        labels=parse_labels(body.get("labels"), "labels"),
        capacity=parse_int(body.get("capacity", 8), "capacity", minimum=1,
                           maximum=MAX_CAPACITY),
    )


def parse_peer_load(body: Mapping[str, object]) -> PeerLoad:
    return PeerLoad(
        active_uploads=parse_int(body.get("active_uploads", 0), "active_uploads", minimum=0,
                                 maximum=1 << 31),
        free_cache=parse_int(body.get("free_cache", 0), "free_cache", minimum=0,
                             maximum=1 << 62),
    )
