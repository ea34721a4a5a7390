"""The Redis peer store: state shared by several supernode replicas (standalone Redis >= 6.2).

Replicas behind one Redis see one cluster: a peer registered through replica A is found by a
lookup on replica B, and when A dies B keeps answering. Every write that reads before it
writes (announce to a live peer, heartbeat, the report that crosses the quarantine threshold,
expiry) is one Lua script, so replicas racing each other cannot half-apply it. A lookup is one
read-only script whatever the batch size, answering with a single JSON string: redis-py's RESP
parser is pure Python and costs far more per reply element than ``json.loads`` does.

Keys, all under ``prefix`` (default ``dfagent:sn:``; one prefix per cluster)::

    peers               hash  peer id -> JSON {address, zone, labels, capacity, registered_at}
    load                hash  peer id -> "ACTIVE_UPLOADS FREE_CACHE"
    seen                zset  peer id, score = last_seen (the liveness timestamp)
    held:<peer id>      set   digests the peer announced
    chunk:<digest>      set   peer ids holding the digest (deleted when empty)
    reports:<peer id>   zset  reporter id, score = time of its latest report
    quarantine          zset  peer id, score = end of its quarantine
    lease               hash  digest -> "HOLDER END SIZE" (a source lease; SIZE: source bytes)
    leases              zset  digest, score = end of its lease (for the sweep)
    leased:<peer id>    zset  digests leased to the peer, score = end
    expected:<digest>   zset  peers expected to hold the digest soon, score = end
    expects:<peer id>   set   digests the peer is expected to hold
    expectations        zset  "DIGEST PEER", score = end (for the sweep)
    nchunks, nentries   counters of non-empty chunk:* sets and of (peer, digest) pairs

Time is never Redis's: liveness and quarantine are timestamps from the supernodes' injected
clock, compared in the scripts against cut-offs the caller passes (see the contract in
:mod:`dfagent.supernode.peerstore.base`). The only Redis TTL is a garbage-collection one on
``reports:*`` keys, far longer than the report window, so it never changes an answer.

Scripts build key names from the prefix, so this store needs a single Redis (or one shard),
not Redis Cluster. Connection and timeout failures raise
:class:`~dfagent.errors.StoreUnavailable`; other Redis errors :class:`~dfagent.errors.StoreError`.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dfagent.errors import StoreError, StoreUnavailable
from dfagent.supernode.model import PeerInfo, PeerLoad, PeerState
from dfagent.supernode.peerstore.base import (
    LeaseOutcome,
    LookupView,
    PeerStore,
    ReportOutcome,
    StoreStats,
)

__all__ = ["RedisPeerStore"]

_EXPIRE_BATCH = 50  # peers removed per script call, so one sweep never blocks Redis for long
_EXPIRE_ROUNDS = 10_000  # bound on script calls per sweep (500,000 peers)
_REPORTS_GC_MIN = 3600  # seconds; the reports:* keys' garbage-collection TTL floor

_LIB = """
local function drop_chunks(p, id)
  local held = p .. 'held:' .. id
  local ds = redis.call('SMEMBERS', held)
  local gone = 0
  for _, d in ipairs(ds) do
    local ck = p .. 'chunk:' .. d
    if redis.call('SREM', ck, id) == 1 and redis.call('EXISTS', ck) == 0 then
      gone = gone + 1
    end
  end
  redis.call('DEL', held)
  if #ds > 0 then redis.call('DECRBY', p .. 'nentries', #ds) end
  if gone > 0 then redis.call('DECRBY', p .. 'nchunks', gone) end
end
local function drop_leases(p, id)
  local mk = p .. 'leased:' .. id
  for _, d in ipairs(redis.call('ZRANGE', mk, 0, -1)) do
    local cur = redis.call('HGET', p .. 'lease', d)
    if cur and string.sub(cur, 1, #id + 1) == id .. ' ' then
      redis.call('HDEL', p .. 'lease', d)
      redis.call('ZREM', p .. 'leases', d)
    end
  end
  redis.call('DEL', mk)
  local ek = p .. 'expects:' .. id
  for _, d in ipairs(redis.call('SMEMBERS', ek)) do
    redis.call('ZREM', p .. 'expected:' .. d, id)
    redis.call('ZREM', p .. 'expectations', d .. ' ' .. id)
  end
  redis.call('DEL', ek)
end
local function remove_peer(p, id)
  drop_chunks(p, id)
  drop_leases(p, id)
  redis.call('HDEL', p .. 'peers', id)
  redis.call('HDEL', p .. 'load', id)
  redis.call('ZREM', p .. 'seen', id)
  redis.call('DEL', p .. 'reports:' .. id)
end
local function live(p, id, alive_since)
  local s = redis.call('ZSCORE', p .. 'seen', id)
  return s and tonumber(s) >= tonumber(alive_since)
end
"""

# ARGV: prefix, id, info JSON, now, reset (0|1)
_REGISTER = _LIB + """
local p, id = ARGV[1], ARGV[2]
if ARGV[5] == '1' then drop_chunks(p, id); drop_leases(p, id) end
redis.call('HSET', p .. 'peers', id, ARGV[3])
redis.call('HSET', p .. 'load', id, '0 0')
redis.call('ZADD', p .. 'seen', ARGV[4], id)
return 1
"""

# ARGV: prefix, id, load, now, alive_since
_HEARTBEAT = _LIB + """
local p, id = ARGV[1], ARGV[2]
if not live(p, id, ARGV[5]) then return 0 end
redis.call('HSET', p .. 'load', id, ARGV[3])
redis.call('ZADD', p .. 'seen', ARGV[4], id)
return 1
"""

# ARGV: prefix, id
_LEAVE = _LIB + """
local p, id = ARGV[1], ARGV[2]
if redis.call('HEXISTS', p .. 'peers', id) == 0 then return 0 end
remove_peer(p, id)
return 1
"""

# ARGV: prefix, alive_since, batch -> ids removed (at most batch)
_EXPIRE = _LIB + """
local p = ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', p .. 'seen', '-inf', '(' .. ARGV[2],
                       'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do remove_peer(p, id) end
return ids
"""

# ARGV: prefix, id, alive_since, digest... -> new entries, or -1 if not live
_ANNOUNCE = _LIB + """
local p, id = ARGV[1], ARGV[2]
if not live(p, id, ARGV[3]) then return -1 end
local held = p .. 'held:' .. id
local added, fresh = 0, 0
for i = 4, #ARGV do
  local d = ARGV[i]
  if redis.call('SADD', held, d) == 1 then
    added = added + 1
    local ck = p .. 'chunk:' .. d
    redis.call('SADD', ck, id)
    if redis.call('SCARD', ck) == 1 then fresh = fresh + 1 end
  end
end
if added > 0 then redis.call('INCRBY', p .. 'nentries', added) end
if fresh > 0 then redis.call('INCRBY', p .. 'nchunks', fresh) end
local mk = p .. 'leased:' .. id
if redis.call('EXISTS', mk) == 1 then
  for i = 4, #ARGV do
    if redis.call('ZREM', mk, ARGV[i]) == 1 then
      redis.call('HDEL', p .. 'lease', ARGV[i])
      redis.call('ZREM', p .. 'leases', ARGV[i])
    end
  end
end
local ek = p .. 'expects:' .. id
if redis.call('EXISTS', ek) == 1 then
  for i = 4, #ARGV do
    if redis.call('SREM', ek, ARGV[i]) == 1 then
      redis.call('ZREM', p .. 'expected:' .. ARGV[i], id)
      redis.call('ZREM', p .. 'expectations', ARGV[i] .. ' ' .. id)
    end
  end
end
return added
"""

# ARGV: prefix, id, until, digest...
_EXPECT = """
local p, id, until_s = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HEXISTS', p .. 'peers', id) == 0 then return 0 end
for i = 4, #ARGV do
  local d = ARGV[i]
  redis.call('ZADD', p .. 'expected:' .. d, until_s, id)
  redis.call('ZADD', p .. 'expectations', until_s, d .. ' ' .. id)
  redis.call('SADD', p .. 'expects:' .. id, d)
end
return 1
"""

# ARGV: prefix, id, now, until, alive_since, limit, byte_limit, (digest, size)...
#   -> JSON [granted digests, {digest: holder}, {holder: [info JSON, load, last_seen]},
#            1 if the requester is live else 0]
_LEASE = _LIB + """
local p, id, now_s, until_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now, since, limit = tonumber(now_s), ARGV[5], tonumber(ARGV[6])
local byte_limit = tonumber(ARGV[7])
local me = live(p, id, since)
local mk = p .. 'leased:' .. id
local held, held_bytes = 0, 0
for _, ld in ipairs(redis.call('ZRANGEBYSCORE', mk, '(' .. now_s, '+inf')) do
  held = held + 1
  local v = redis.call('HGET', p .. 'lease', ld)
  if v then
    local a = string.find(v, ' ', 1, true)
    local b = string.find(v, ' ', a + 1, true)
    if b then held_bytes = held_bytes + tonumber(string.sub(v, b + 1)) end
  end
end
local granted, others, peers = {}, {}, {}
for i = 8, #ARGV, 2 do
  local d, size_s = ARGV[i], ARGV[i + 1]
  local size = tonumber(size_s)
  local cur = redis.call('HGET', p .. 'lease', d)
  local free, old = true, nil
  if cur then
    local sp = string.find(cur, ' ', 1, true)
    local holder = string.sub(cur, 1, sp - 1)
    local rest = string.sub(cur, sp + 1)
    local sp2 = string.find(rest, ' ', 1, true)
    local e, cur_size = tonumber(rest), 0
    if sp2 then
      e = tonumber(string.sub(rest, 1, sp2 - 1))
      cur_size = tonumber(string.sub(rest, sp2 + 1))
    end
    if holder == id then
      free = false
      if me then
        if e <= now then
          held = held + 1
          held_bytes = held_bytes + cur_size
        end
        redis.call('HSET', p .. 'lease', d, id .. ' ' .. until_s .. ' ' .. cur_size)
        redis.call('ZADD', p .. 'leases', until_s, d)
        redis.call('ZADD', mk, until_s, d)
        granted[#granted + 1] = d
      end
    elseif e > now and live(p, holder, since) then
      free = false
      others[d] = holder
      if not peers[holder] then
        peers[holder] = {redis.call('HGET', p .. 'peers', holder) or '',
                         redis.call('HGET', p .. 'load', holder) or '',
                         redis.call('ZSCORE', p .. 'seen', holder) or ''}
      end
    else
      old = holder
    end
  end
  if free and me and held < limit and
      (byte_limit <= 0 or held == 0 or held_bytes + size <= byte_limit) then
    if old then redis.call('ZREM', p .. 'leased:' .. old, d) end
    redis.call('HSET', p .. 'lease', d, id .. ' ' .. until_s .. ' ' .. size_s)
    redis.call('ZADD', p .. 'leases', until_s, d)
    redis.call('ZADD', mk, until_s, d)
    held = held + 1
    held_bytes = held_bytes + size
    granted[#granted + 1] = d
  end
end
return cjson.encode({granted, others, peers, me and 1 or 0})
"""

# ARGV: prefix, now, batch -> leases forgotten (at most batch)
_EXPIRE_LEASES = """
local p = ARGV[1]
local ds = redis.call('ZRANGEBYSCORE', p .. 'leases', '-inf', '(' .. ARGV[2],
                      'LIMIT', 0, tonumber(ARGV[3]))
for _, d in ipairs(ds) do
  local cur = redis.call('HGET', p .. 'lease', d)
  if cur then
    local holder = string.sub(cur, 1, string.find(cur, ' ', 1, true) - 1)
    redis.call('ZREM', p .. 'leased:' .. holder, d)
    redis.call('HDEL', p .. 'lease', d)
  end
  redis.call('ZREM', p .. 'leases', d)
end
local es = redis.call('ZRANGEBYSCORE', p .. 'expectations', '-inf', '(' .. ARGV[2],
                      'LIMIT', 0, tonumber(ARGV[3]))
for _, e in ipairs(es) do
  local sp = string.find(e, ' ', 1, true)
  local d, id = string.sub(e, 1, sp - 1), string.sub(e, sp + 1)
  redis.call('ZREM', p .. 'expected:' .. d, id)
  redis.call('SREM', p .. 'expects:' .. id, d)
  redis.call('ZREM', p .. 'expectations', e)
end
return #ds + #es
"""

# ARGV: prefix, id, digest... -> entries removed
_WITHDRAW = """
local p, id = ARGV[1], ARGV[2]
local held = p .. 'held:' .. id
local removed, gone = 0, 0
for i = 3, #ARGV do
  local d = ARGV[i]
  if redis.call('SREM', held, d) == 1 then
    removed = removed + 1
    local ck = p .. 'chunk:' .. d
    redis.call('SREM', ck, id)
    if redis.call('EXISTS', ck) == 0 then gone = gone + 1 end
  end
end
if removed > 0 then redis.call('DECRBY', p .. 'nentries', removed) end
if gone > 0 then redis.call('DECRBY', p .. 'nchunks', gone) end
return removed
"""

# ARGV: prefix, peer, reporter, now, window_start, threshold, until, gc_ttl
#   -> {reports, quarantined, newly_quarantined}
_REPORT = """
local p, peer = ARGV[1], ARGV[2]
local q = redis.call('ZSCORE', p .. 'quarantine', peer)
if q and tonumber(q) > tonumber(ARGV[4]) then return {0, 1, 0} end
local rk = p .. 'reports:' .. peer
redis.call('ZREMRANGEBYSCORE', rk, '-inf', '(' .. ARGV[5])
redis.call('ZADD', rk, ARGV[4], ARGV[3])
local n = redis.call('ZCARD', rk)
if n >= tonumber(ARGV[6]) then
  redis.call('ZADD', p .. 'quarantine', ARGV[7], peer)
  redis.call('DEL', rk)
  return {n, 1, 1}
end
redis.call('EXPIRE', rk, ARGV[8])
return {n, 0, 0}
"""


# ARGV: prefix, reports_since, requester ("" = none), now ("" = no expectations), digest...
#   -> one JSON string (one reply to parse, in C):
#   [{digest: [peer id, ...]}, {peer id: [info JSON, load, last_seen, quarantine end, reports]},
#    requester's info JSON, {digest: [expected peer id, ...]}]
# (cjson writes an empty table as {}; peers that left are omitted; missing values are "").
_LOOKUP = """
local p, since = ARGV[1], ARGV[2]
local holders, ids, known, expected = {}, {}, {}, {}
local now = ARGV[4]
for i = 5, #ARGV do
  local m = redis.call('SMEMBERS', p .. 'chunk:' .. ARGV[i])
  if #m > 0 then
    holders[ARGV[i]] = m
    for _, id in ipairs(m) do
      if not known[id] then known[id] = true; ids[#ids + 1] = id end
    end
  end
  if now ~= '' then
    local e = redis.call('ZRANGEBYSCORE', p .. 'expected:' .. ARGV[i], '(' .. now, '+inf')
    if #e > 0 then
      expected[ARGV[i]] = e
      for _, id in ipairs(e) do
        if not known[id] then known[id] = true; ids[#ids + 1] = id end
      end
    end
  end
end
local peers = {}
for _, id in ipairs(ids) do
  local info = redis.call('HGET', p .. 'peers', id)
  if info then
    peers[id] = {info, redis.call('HGET', p .. 'load', id) or '',
                 redis.call('ZSCORE', p .. 'seen', id) or '',
                 redis.call('ZSCORE', p .. 'quarantine', id) or '',
                 redis.call('ZCOUNT', p .. 'reports:' .. id, since, '+inf')}
  end
end
local me = ''
if ARGV[3] ~= '' then me = redis.call('HGET', p .. 'peers', ARGV[3]) or '' end
return cjson.encode({holders, peers, me, expected})
"""

_INFO_CACHE_MAX = 50_000  # decoded peer records kept (by their JSON text)


def _f(x: float) -> str:
    """A float as Redis reads it (``repr`` round-trips; infinities as Redis spells them)."""
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return repr(float(x))


def _info_json(info: PeerInfo, registered_at: float) -> str:
    return json.dumps({"address": info.address, "zone": info.zone, "labels": dict(info.labels),
                       "capacity": info.capacity, "registered_at": registered_at},
                      separators=(",", ":"))


def _decode_info(peer_id: str, info_json: str) -> tuple[PeerInfo, float]:
    d = json.loads(info_json)
    info = PeerInfo(id=peer_id, address=d["address"], zone=d["zone"], labels=d["labels"],
                    capacity=int(d["capacity"]))
    return info, float(d["registered_at"])


def _state(peer_id: str, info_json: str, load: str | None, seen: float,
           cache: dict[tuple[str, str], tuple[PeerInfo, float]] | None = None) -> PeerState:
    try:
        key = (peer_id, info_json)
        decoded = cache.get(key) if cache is not None else None
        if decoded is None:
            decoded = _decode_info(peer_id, info_json)
            if cache is not None:
                if len(cache) >= _INFO_CACHE_MAX:
                    cache.clear()
                cache[key] = decoded
        info, registered_at = decoded
        active, free = (load or "0 0").split()
        return PeerState(info=info, load=PeerLoad(int(active), int(free)),
                         registered_at=registered_at, last_seen=seen)
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"redis: corrupt record for peer {peer_id!r}: {exc}") from exc


class RedisPeerStore(PeerStore):
    """Peer state in Redis; see the module docstring for the key layout."""

    name = "redis"

    def __init__(self, url: str, *, prefix: str = "dfagent:sn:", max_connections: int = 32,
                 timeout: float = 2.0) -> None:
        self._url = url
        self._p = prefix
        self._max_connections = max_connections
        self._timeout = timeout
        self._r: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._infos: dict[tuple[str, str], tuple[PeerInfo, float]] = {}

    # -- plumbing ------------------------------------------------------------------------

    async def open(self) -> None:
        if self._r is not None:
            return
        try:
            pool = aioredis.BlockingConnectionPool.from_url(
                self._url, max_connections=self._max_connections, timeout=self._timeout,
                socket_timeout=self._timeout, socket_connect_timeout=self._timeout,
                decode_responses=True)
        except ValueError as exc:
            raise StoreError(f"redis: invalid url {self._url!r}: {exc}") from exc
        # One immediate retry (a pooled connection dropped by a Redis restart), no backoff:
        # a down Redis must fail fast so requests get a 503, not a stall.
        self._r = aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 1))
        for name, src in (("register", _REGISTER), ("heartbeat", _HEARTBEAT),
                          ("leave", _LEAVE), ("expire", _EXPIRE), ("announce", _ANNOUNCE),
                          ("withdraw", _WITHDRAW), ("report", _REPORT), ("lookup", _LOOKUP),
                          ("lease", _LEASE), ("expire_leases", _EXPIRE_LEASES),
                          ("expect", _EXPECT)):
            self._scripts[name] = self._r.register_script(src)

    async def close(self) -> None:
        r, self._r = self._r, None
        if r is not None:
            with contextlib.suppress(RedisError, OSError):
                await r.aclose()
            with contextlib.suppress(RedisError, OSError):
                await r.connection_pool.disconnect()

    @property
    def _redis(self) -> aioredis.Redis:
        if self._r is None:
            raise StoreError("redis store used before open()")
        return self._r

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError) as exc:
            raise StoreUnavailable(f"redis {self._url_for_humans()}: {what}: {exc}") from exc
        except RedisError as exc:
            raise StoreError(f"redis {self._url_for_humans()}: {what}: {exc}") from exc

    def _url_for_humans(self) -> str:
        head, at, tail = self._url.rpartition("@")  # never log a password
        return f"{head.split('://')[0]}://***@{tail}" if at else self._url

    async def _script(self, name: str, args: Sequence[object]) -> Any:
        with self._errors(name):
            return await self._scripts[name](keys=[], args=list(args))

    async def ping(self) -> bool:
        try:
            with self._errors("ping"):
                return bool(await self._redis.ping())
        except StoreError:
            return False

    # -- peers ---------------------------------------------------------------------------

    async def register(self, info: PeerInfo, *, now: float, reset: bool) -> None:
        await self._script("register", [self._p, info.id, _info_json(info, now), _f(now),
                                        "1" if reset else "0"])

    async def heartbeat(self, peer_id: str, load: PeerLoad, *, now: float,
                        alive_since: float) -> bool:
        ok = await self._script("heartbeat", [
            self._p, peer_id, f"{load.active_uploads} {load.free_cache}", _f(now),
            _f(alive_since)])
        return bool(ok)

    async def leave(self, peer_id: str) -> bool:
        return bool(await self._script("leave", [self._p, peer_id]))

    async def get_peer(self, peer_id: str) -> tuple[PeerState, int] | None:
        p = self._p
        with self._errors("get peer"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hget(p + "peers", peer_id)
                pipe.hget(p + "load", peer_id)
                pipe.zscore(p + "seen", peer_id)
                pipe.scard(p + "held:" + peer_id)
                info, load, seen, held = await pipe.execute()
        if info is None or seen is None:
            return None
        return _state(peer_id, info, load, float(seen)), int(held)

    async def expire(self, alive_since: float) -> list[str]:
        gone: list[str] = []
        for _ in range(_EXPIRE_ROUNDS):
            ids = await self._script("expire", [self._p, _f(alive_since), _EXPIRE_BATCH])
            gone += ids
            if len(ids) < _EXPIRE_BATCH:
                break
        return gone

    # -- chunks --------------------------------------------------------------------------

    async def announce(self, peer_id: str, digests: Sequence[str], *,
                       alive_since: float) -> int | None:
        added = int(await self._script("announce", [self._p, peer_id, _f(alive_since),
                                                    *digests]))
        return None if added < 0 else added

    async def withdraw(self, peer_id: str, digests: Sequence[str]) -> int:
        return int(await self._script("withdraw", [self._p, peer_id, *digests]))

    async def lookup(self, digests: Sequence[str], *, reports_since: float,
                     requester: str | None = None, now: float | None = None) -> LookupView:
        raw = await self._script("lookup", [self._p, _f(reports_since), requester or "",
                                            "" if now is None else _f(now), *digests])
        try:
            found, described, me, expected = json.loads(raw)
            zone = (_state(requester, me, None, 0.0, self._infos).info.zone
                    if requester and me else None)
        except (ValueError, TypeError) as exc:
            raise StoreError(f"redis: malformed lookup reply: {exc}") from exc
        holders: dict[str, list[str]] = found or {}  # cjson encodes an empty table as {}
        peers: dict[str, PeerState] = {}
        quarantined: dict[str, float] = {}
        reports: dict[str, int] = {}
        cache = self._infos
        for pid, (info, load, seen, until, n) in (described or {}).items():
            if seen != "":
                peers[pid] = _state(pid, info, load, float(seen), cache)
            if until != "":
                quarantined[pid] = float(until)
            if n:
                reports[pid] = int(n)
        return LookupView(holders=holders, peers=peers, quarantined=quarantined,
                          reports=reports, requester_zone=zone, expected=expected or {})

    # -- source leases -------------------------------------------------------------------

    async def lease(self, peer_id: str, digests: Sequence[str], *, now: float, until: float,
                    alive_since: float, limit: int, sizes: Sequence[int] | None = None,
                    byte_limit: int = 0) -> LeaseOutcome:
        pairs: list[object] = []
        for i, d in enumerate(digests):
            pairs += [d, sizes[i] if sizes is not None and i < len(sizes) else 0]
        raw = await self._script("lease", [self._p, peer_id, _f(now), _f(until),
                                           _f(alive_since), limit, byte_limit, *pairs])
        try:
            granted, others, described, live = json.loads(raw)
            peers = {pid: _state(pid, info, load, float(seen), self._infos)
                     for pid, (info, load, seen) in (described or {}).items()}
        except (ValueError, TypeError) as exc:
            raise StoreError(f"redis: malformed lease reply: {exc}") from exc
        # cjson encodes an empty table as {}: an empty list of granted digests too.
        return LeaseOutcome(granted=list(granted or []), others=dict(others or {}),
                            peers=peers, live=bool(live))

    async def expect(self, peer_id: str, digests: Sequence[str], *, until: float) -> None:
        if digests:
            await self._script("expect", [self._p, peer_id, _f(until), *digests])

    async def expire_leases(self, now: float) -> int:
        n = 0
        for _ in range(_EXPIRE_ROUNDS):
            got = int(await self._script("expire_leases", [self._p, _f(now), 1000]))
            n += got
            if got < 1000:
                break
        return n

    # -- reports -------------------------------------------------------------------------

    async def report(self, peer_id: str, reporter: str, *, now: float, window_start: float,
                     threshold: int, quarantine_until: float) -> ReportOutcome:
        gc_ttl = max(_REPORTS_GC_MIN, math.ceil(now - window_start) * 2)
        n, quarantined, newly = await self._script("report", [
            self._p, peer_id, reporter, _f(now), _f(window_start), threshold,
            _f(quarantine_until), gc_ttl])
        return ReportOutcome(reports=int(n), quarantined=bool(quarantined),
                             newly_quarantined=bool(newly))

    async def quarantined_until(self, peer_id: str) -> float | None:
        with self._errors("quarantine"):
            until = await self._redis.zscore(self._p + "quarantine", peer_id)
        return None if until is None else float(until)

    async def expire_quarantines(self, now: float) -> int:
        with self._errors("expire quarantines"):
            return int(await self._redis.zremrangebyscore(self._p + "quarantine", "-inf",
                                                          "(" + _f(now)))

    # -- sizes ---------------------------------------------------------------------------

    async def stats(self, *, now: float) -> StoreStats:
        p = self._p
        with self._errors("stats"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hlen(p + "peers")
                pipe.get(p + "nchunks")
                pipe.get(p + "nentries")
                pipe.zcount(p + "quarantine", "(" + _f(now), "+inf")
                peers, chunks, entries, quarantined = await pipe.execute()
        return StoreStats(peers=int(peers), chunks=int(chunks or 0),
                          entries=int(entries or 0), quarantined=int(quarantined))

