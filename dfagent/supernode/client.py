"""The supernode client the peer agent (and ``dfagent get``) uses: failover, bounded time.

The P2P layer is an optimisation, so this client's first duty is never to make a peer wait:
every attempt has a timeout, each supernode is tried at most once per call, and when none
answers the call raises :class:`~dfagent.errors.SupernodeUnavailable` so the caller goes to the
source. Worst case per call: ``len(urls) * timeout`` seconds.

Failover: the supernode that answered last is tried first (sticky, so a peer does not flap
between replicas); a supernode that failed (connection refused or reset, timeout, 5xx, 429,
a malformed answer) is put last for ``retry_after`` seconds, so while one replica is down calls
do not pay its timeout. Every operation is idempotent, so retrying one on the next replica after
a timeout is safe.

Errors (:mod:`dfagent.errors`):

* :class:`SupernodeUnavailable` — nobody answered: fall back to the source, retry later.
* :class:`UnknownPeer` — the supernode does not know this peer (first contact, its state was
  lost, or the peer missed heartbeats for longer than ``peer_ttl``): call
  :meth:`SupernodeClient.register` with ``reset=True`` and announce again.
* :class:`Unauthorized` — wrong or missing cluster token (not retried elsewhere: fix config).
* :class:`SupernodeRejected` — any other 4xx: the request was invalid.

Signatures (all methods are coroutines; the client is an async context manager)::

    SupernodeClient(urls: Sequence[str], *, token: str | None = None, timeout: float = 2.0,
                    ssl: ssl.SSLContext | bool = True, retry_after: float = 10.0,
                    clock: Callable[[], float] = time.monotonic)
    register(info: PeerInfo, *, reset: bool = False) -> Registration
    heartbeat(peer_id: str, load: PeerLoad | None = None) -> None
    leave(peer_id: str) -> bool
    peer(peer_id: str) -> dict[str, Any]
    announce(peer_id: str, digests: Iterable[str]) -> int
    withdraw(peer_id: str, digests: Iterable[str]) -> int
    lookup(digests: Iterable[str], *, requester: str | None = None, zone: str | None = None,
           k: int | None = None, timeout: float | None = None) -> dict[str, list[PeerRef]]
    lookup_leased(digests: Iterable[str], *, requester: str, zone: str | None = None,
                  k: int | None = None, timeout: float | None = None,
                  sizes: Mapping[str, int] | None = None) -> LookupResult
    report(peer_id: str, *, reporter: str, reason: str, digest: str | None = None) -> ReportAck
    close() -> None

This module must not import ``aiohttp.web`` (it runs inside the peer agent).
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp
import yarl

from dfagent.errors import (
    SupernodeRejected,
    SupernodeUnavailable,
    Unauthorized,
    UnknownPeer,
)
from dfagent.supernode.model import (
    MAX_ANNOUNCE,
    MAX_LOOKUP,
    REPORT_REASONS,
    PeerInfo,
    PeerLoad,
    check_digest,
)

__all__ = ["LookupResult", "PeerRef", "Registration", "ReportAck", "SupernodeClient"]


@dataclass(frozen=True, slots=True)
class PeerRef:
    """A peer a lookup named: where its upload server is and which zone it is in."""

    id: str
    address: str
    zone: str


@dataclass(slots=True)
class LookupResult:
    """A lookup with leases: ``chunks`` as :meth:`SupernodeClient.lookup` answers; of the
    digests nobody holds, ``leases`` are this peer's to fetch from the source, ``fetching``
    maps those another peer is fetching to that peer (ask it: it serves the chunk once it has
    it); any other digest nobody holds was refused a lease (this peer holds its limit): ask
    again shortly."""

    chunks: dict[str, list[PeerRef]]
    leases: set[str] = field(default_factory=set)
    fetching: dict[str, PeerRef] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Registration:
    """The supernode's answer to a registration: heartbeat at least every
    ``heartbeat_interval`` seconds, or be dropped after ``peer_ttl``."""

    peer_ttl: float
    heartbeat_interval: float
    supernode: str  # the URL that accepted it
    lease_ttl: float | None = None  # how long a source lease lasts unrenewed (None: not said)


@dataclass(frozen=True, slots=True)
class ReportAck:
    counted: bool  # False: ignored (the reporter is quarantined or the peer is unknown)
    reports: int  # distinct reporters of that peer within the window
    quarantined: bool  # the peer is quarantined now


class _Failed(Exception):
    """One supernode failed one attempt; the message says how."""


class SupernodeClient:
    """Talks to one of several supernodes; see the module docstring for the contract."""

    def __init__(self, urls: Sequence[str], *, token: str | None = None, timeout: float = 2.0,
                 ssl: ssl_module.SSLContext | bool = True, retry_after: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(urls, str) or not urls:
            raise ValueError("urls: give a non-empty list of supernode URLs")
        self._urls = [u.rstrip("/") for u in urls]
        for u in self._urls:
            if yarl.URL(u).scheme not in ("http", "https"):
                raise ValueError(f"supernode URL {u!r}: expected http:// or https://")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._ssl = ssl
        self._retry_after = retry_after
        self._clock = clock
        self._down_until: dict[str, float] = {}
        self._current: str | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def urls(self) -> list[str]:
        return list(self._urls)

    @property
    def current(self) -> str | None:
        """The supernode that answered last (``None`` before the first answer)."""
        return self._current

    async def __aenter__(self) -> SupernodeClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- operations ----------------------------------------------------------------------

    async def register(self, info: PeerInfo, *, reset: bool = False) -> Registration:
        body = {"address": info.address, "zone": info.zone, "labels": dict(info.labels),
                "capacity": info.capacity, "reset": reset}
        data = await self._call("PUT", f"/api/v1/peers/{info.id}", body)
        try:
            lease_ttl = data.get("lease_ttl")
            return Registration(peer_ttl=float(data["peer_ttl"]),
                                heartbeat_interval=float(data["heartbeat_interval"]),
                                supernode=self._current or "",
                                lease_ttl=None if lease_ttl is None else float(lease_ttl))
        except (KeyError, TypeError, ValueError) as exc:
            raise SupernodeRejected(f"supernode: malformed register answer: {exc}",
                                    status=200, code="malformed") from exc

    async def heartbeat(self, peer_id: str, load: PeerLoad | None = None) -> None:
        """Report liveness and load (``None``: zero load). Raises :class:`UnknownPeer` when the
        peer must register again."""
        body = (load or PeerLoad()).to_json()
        await self._call("POST", f"/api/v1/peers/{peer_id}/heartbeat", body)

    async def leave(self, peer_id: str) -> bool:
        data = await self._call("DELETE", f"/api/v1/peers/{peer_id}", None)
        return bool(data.get("removed"))

    async def peer(self, peer_id: str) -> dict[str, Any]:
        """The supernode's view of a peer (the JSON of ``GET /api/v1/peers/{id}``)."""
        return await self._call("GET", f"/api/v1/peers/{peer_id}", None)

    async def announce(self, peer_id: str, digests: Iterable[str]) -> int:
        """Announce any number of digests (sent in batches); the number new to the index."""
        added = 0
        for batch in _batches(digests, MAX_ANNOUNCE):
            data = await self._call("POST", f"/api/v1/peers/{peer_id}/announce",
                                    {"digests": batch})
            added += int(data.get("added", 0))
        return added

    async def withdraw(self, peer_id: str, digests: Iterable[str]) -> int:
        removed = 0
        for batch in _batches(digests, MAX_ANNOUNCE):
            data = await self._call("POST", f"/api/v1/peers/{peer_id}/withdraw",
                                    {"digests": batch})
            removed += int(data.get("removed", 0))
        return removed

    async def lookup(self, digests: Iterable[str], *, requester: str | None = None,
                     zone: str | None = None, k: int | None = None,
                     timeout: float | None = None) -> dict[str, list[PeerRef]]:
        """Ranked peers (best first, at most ``k``) for each digest; every requested digest is
        a key, with ``[]`` when no peer can serve it.

        ``requester`` (this peer's id) is never returned and gives its zone to prefer; ``zone``
        overrides that. ``timeout`` overrides the per-attempt timeout (keep it short on the
        fetch path). Batches above the server's limit are split.
        """
        got = await self._lookup(digests, requester=requester, zone=zone, k=k,
                                 timeout=timeout, lease=False)
        return got.chunks

    async def lookup_leased(self, digests: Iterable[str], *, requester: str,
                            zone: str | None = None, k: int | None = None,
                            timeout: float | None = None,
                            sizes: Mapping[str, int] | None = None,
                            expect: bool = True) -> LookupResult:
        """:meth:`lookup` that also takes source leases for the digests nobody holds
        (docs/api.md, "Lookup"): see :class:`LookupResult`. ``sizes``: each digest's source
        size in bytes (the supernode bounds a peer's leases in bytes; missing: 0).
        ``expect`` False: leases only; the requester is not recorded as expected to hold
        the chunks it was pointed at peers for (a look-ahead it will not act on yet)."""
        return await self._lookup(digests, requester=requester, zone=zone, k=k,
                                  timeout=timeout, lease=True, sizes=sizes, expect=expect)

    async def _lookup(self, digests: Iterable[str], *, requester: str | None,
                      zone: str | None, k: int | None, timeout: float | None,
                      lease: bool, sizes: Mapping[str, int] | None = None,
                      expect: bool = True) -> LookupResult:
        wanted = list(dict.fromkeys(digests))
        out = LookupResult(chunks={d: [] for d in wanted})
        for batch in _batches(wanted, MAX_LOOKUP):
            body: dict[str, object] = {"digests": batch}
            if requester is not None:
                body["requester"] = requester
            if zone is not None:
                body["zone"] = zone
            if k is not None:
                body["k"] = k
            if lease:
                body["lease"] = True
                if sizes:
                    body["sizes"] = [sizes.get(d, 0) for d in batch]
                if not expect:
                    body["expect"] = False
            data = await self._call("POST", "/api/v1/lookup", body, timeout=timeout,
                                    check=_check_lookup)
            peers = {pid: PeerRef(id=pid, address=p["address"], zone=p.get("zone", ""))
                     for pid, p in data["peers"].items()}
            for d, ids in data["chunks"].items():
                if d in out.chunks:
                    out.chunks[d] = [peers[pid] for pid in ids]
            for d in data.get("leases", ()):
                if d in out.chunks:
                    out.leases.add(d)
            for d, pid in data.get("fetching", {}).items():
                if d in out.chunks:
                    out.fetching[d] = peers[pid]
        return out

    async def report(self, peer_id: str, *, reporter: str, reason: str,
                     digest: str | None = None) -> ReportAck:
        """Report ``peer_id`` as bad (``reason``: corrupt, timeout, refused or error).

        Raises :class:`UnknownPeer` when the *reporter* is not registered.
        """
        if reason not in REPORT_REASONS:
            raise ValueError(f"reason: expected one of {', '.join(REPORT_REASONS)}")
        body: dict[str, object] = {"reporter": reporter, "reason": reason}
        if digest is not None:
            body["digest"] = check_digest(digest, "digest")
        data = await self._call("POST", f"/api/v1/peers/{peer_id}/reports", body)
        return ReportAck(counted=bool(data.get("counted")), reports=int(data.get("reports", 0)),
                         quarantined=bool(data.get("quarantined")))

    # -- transport -----------------------------------------------------------------------

    def _order(self) -> list[str]:
        """Healthy supernodes first (the last one that answered, then config order), then those
        that failed recently, the longest-failed first."""
        now = self._clock()
        healthy = [u for u in self._urls if self._down_until.get(u, 0.0) <= now]
        if self._current in healthy:
            healthy.remove(self._current)
            healthy.insert(0, self._current)
        resting = sorted((u for u in self._urls if u not in healthy),
                         key=lambda u: self._down_until[u])
        return healthy + resting

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No cookie jar: the supernode sets none, and filtering an empty jar on every
            # call was ~1% of a busy peer's Python time.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=64),
                headers=self._headers, cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def _call(self, method: str, path: str, body: object, *,
                    timeout: float | None = None,
                    check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        session = self._get_session()
        t = self._timeout if timeout is None else timeout
        failures: list[str] = []
        for url in self._order():
            try:
                data = await self._attempt(session, method, url + path, body, t)
                if check is not None:
                    check(data)
            except _Failed as exc:
                failures.append(f"{url}: {exc}")
                self._down_until[url] = self._clock() + self._retry_after
                continue
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                failures.append(f"{url}: malformed answer ({exc!r})")
                self._down_until[url] = self._clock() + self._retry_after
                continue
            self._down_until.pop(url, None)
            self._current = url
            return data
        raise SupernodeUnavailable("no supernode answered: " + "; ".join(failures))

    async def _attempt(self, session: aiohttp.ClientSession, method: str, url: str,
                       body: object, timeout: float) -> dict[str, Any]:
        """One request to one supernode; :class:`_Failed` means "try the next one"."""
        try:
            async with asyncio.timeout(timeout):
                async with session.request(method, url, json=body) as resp:
                    status = resp.status
                    try:
                        data = await resp.json(content_type=None)
                    except ValueError:
                        data = None
        except TimeoutError:
            raise _Failed(f"no answer within {timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _Failed(f"{type(exc).__name__}: {exc}") from None
        if status >= 500 or status == 429:
            raise _Failed(f"HTTP {status}: {_message(data)}")
        if not isinstance(data, dict):
            raise _Failed(f"HTTP {status}: answer is not a JSON object")
        if status < 400:
            return data
        code = _code(data)
        message = f"supernode {url.split('/api/')[0]}: HTTP {status} {code}: {_message(data)}"
        if status == 401:
            raise Unauthorized(message, status=status, code=code)
        if status == 404 and code == "unknown_peer":
            raise UnknownPeer(message, status=status, code=code)
        raise SupernodeRejected(message, status=status, code=code)


def _code(data: object) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("code", "error"))
    return "error"


def _message(data: object) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message", ""))[:300]
    return "no JSON error body"


def _check_lookup(data: dict[str, Any]) -> None:
    """Raises ``ValueError``/``TypeError``/``KeyError`` unless ``data`` is a lookup answer whose
    chunks name only peers it describes."""
    chunks, peers = data["chunks"], data["peers"]
    if not isinstance(chunks, dict) or not isinstance(peers, dict):
        raise TypeError("chunks and peers must be objects")
    for p in peers.values():
        if not isinstance(p["address"], str):
            raise TypeError("peer address must be a string")
    for ids in chunks.values():
        if not isinstance(ids, list) or any(pid not in peers for pid in ids):
            raise ValueError("a chunk names a peer the answer does not describe")
    leases, fetching = data.get("leases", []), data.get("fetching", {})
    if not isinstance(leases, list) or not all(isinstance(d, str) for d in leases):
        raise TypeError("leases must be a list of digests")
    if not isinstance(fetching, dict) or any(pid not in peers for pid in fetching.values()):
        raise ValueError("fetching names a peer the answer does not describe")


def _batches(items: Iterable[str], size: int) -> Iterable[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
