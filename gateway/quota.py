"""Per-key admission: key lookup, revocation, token budget, requests and tokens per minute,
and concurrent requests, decided in one atomic step.

Two stores implement :class:`QuotaStore`: :class:`MemoryQuota` (one gateway) and
:class:`RedisQuota`, where the decision is one Lua script, so that every gateway sharing the
Redis shares the counts (a key's N+1st request in a minute is refused whichever gateway it
reaches). Windows slide over the last 60 s:

- requests: a sorted set of admitted requests' timestamps (ms); entries older than the
  window are dropped before counting;
- tokens: a hash of second -> tokens spent in that second (prompt + completion, counted when
  a request finishes); a key is refused once the window's sum reaches its limit;
- concurrent: a counter, incremented on admission and decremented on settlement; it expires
  after ``concurrency_ttl_ms`` so that a gateway that died mid-request does not hold a slot
  for ever;
- budget: a counter of all tokens ever spent by the key.

Redis layout, under the prefix (``switchyard:``): ``key:{hash}`` (hash: id, name, limits,
revoked, ...), ``keyid:{id}`` -> hash, ``keys`` (set of hashes), ``req:{id}``, ``tok:{id}``,
``conc:{id}``, ``spent:{id}``.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from gateway.api_keys import LIMIT_FIELDS, KeyLimits, KeyRecord

WINDOW_MS = 60_000


@dataclass(frozen=True, slots=True)
class DefaultLimits:
    rpm: int = 0
    tpm: int = 0
    concurrent: int = 0


@dataclass(slots=True)
class Admission:
    """The decision for one request. ``status`` is ``ok``, ``unknown`` (no such key),
    ``revoked``, ``requests``, ``tokens``, ``concurrent`` (a limit reached) or ``budget``.
    Limits of 0 are unlimited; ``retry_after_ms`` is when the refused limit frees up."""

    status: str
    key_id: str = ""
    rpm: int = 0
    remaining_requests: int = 0
    tpm: int = 0
    remaining_tokens: int = 0
    reset_requests_ms: int = 0
    reset_tokens_ms: int = 0
    retry_after_ms: int = 0


class QuotaStoreUnavailable(Exception):
    """The store (Redis) cannot be reached."""


class QuotaStore(ABC):
    """Keys and their counters. Every method is atomic with respect to the others."""

    @abstractmethod
    async def put_key(self, record: KeyRecord) -> None:
        """Stores a key, replacing its limits and name; a key already revoked stays revoked."""

    @abstractmethod
    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    @abstractmethod
    async def list_keys(self) -> list[KeyRecord]: ...

    @abstractmethod
    async def update_key(
        self, key_id: str, *, limits: dict[str, int | None], revoked: bool | None
    ) -> KeyRecord | None:
        """Sets the given limits (None: back to the default) and/or the revoked flag."""

    @abstractmethod
    async def spent(self, key_id: str) -> int: ...

    @abstractmethod
    async def admit(
        self, key_hash: str, request_id: str, defaults: DefaultLimits, now_ms: int
    ) -> Admission: ...

    @abstractmethod
    async def settle(self, key_id: str, tokens: int, now_ms: int) -> None:
        """A request of ``key_id`` finished having spent ``tokens``."""

    async def close(self) -> None:
        return None


def _limit(value: int | None, default: int) -> int:
    return default if value is None else value


# ---------------------------------------------------------------------------------------------
# memory


@dataclass(slots=True)
class _Counters:
    requests: list[int] = field(default_factory=list)  # admission times, sorted
    tokens: dict[int, int] = field(default_factory=dict)  # second -> tokens
    concurrent: int = 0
    spent: int = 0


class MemoryQuota(QuotaStore):
    """Everything in this process: for one gateway, or when no Redis is configured."""

    def __init__(self) -> None:
        self._by_hash: dict[str, KeyRecord] = {}
        self._by_id: dict[str, KeyRecord] = {}
        self._counters: dict[str, _Counters] = {}
        self._lock = asyncio.Lock()

    async def put_key(self, record: KeyRecord) -> None:
        async with self._lock:
            existing = self._by_hash.get(record.key_hash)
            if existing is not None and existing.revoked:
                record.revoked = True
            self._by_hash[record.key_hash] = record
            self._by_id[record.id] = record

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return self._by_id.get(key_id)

    async def list_keys(self) -> list[KeyRecord]:
        return sorted(self._by_id.values(), key=lambda record: (record.created, record.id))

    async def update_key(
        self, key_id: str, *, limits: dict[str, int | None], revoked: bool | None
    ) -> KeyRecord | None:
        async with self._lock:
            record = self._by_id.get(key_id)
            if record is None:
                return None
            for name, value in limits.items():
                setattr(record.limits, name, value)
            if revoked is not None:
                record.revoked = revoked
            return record

    async def spent(self, key_id: str) -> int:
        counters = self._counters.get(key_id)
        return counters.spent if counters else 0

    async def admit(
        self, key_hash: str, request_id: str, defaults: DefaultLimits, now_ms: int
    ) -> Admission:
        async with self._lock:
            record = self._by_hash.get(key_hash)
            if record is None:
                return Admission("unknown")
            if record.revoked:
                return Admission("revoked", record.id)
            counters = self._counters.setdefault(record.id, _Counters())
            return _decide(record.id, record.limits, defaults, counters, now_ms)

    async def settle(self, key_id: str, tokens: int, now_ms: int) -> None:
        async with self._lock:
            counters = self._counters.setdefault(key_id, _Counters())
            counters.concurrent = max(counters.concurrent - 1, 0)
            if tokens > 0:
                second = now_ms // 1000
                counters.tokens[second] = counters.tokens.get(second, 0) + tokens
                counters.spent += tokens


def _decide(
    key_id: str, limits: KeyLimits, defaults: DefaultLimits, counters: _Counters, now_ms: int
) -> Admission:
    """The memory store's decision; the Redis script below is its twin."""
    rpm = _limit(limits.rpm, defaults.rpm)
    tpm = _limit(limits.tpm, defaults.tpm)
    concurrent = _limit(limits.concurrent, defaults.concurrent)
    budget = limits.budget or 0
    if budget > 0 and counters.spent >= budget:
        return Admission("budget", key_id, rpm=rpm, tpm=tpm)
    horizon = now_ms - WINDOW_MS
    del counters.requests[: bisect.bisect_right(counters.requests, horizon)]
    for second in [s for s in counters.tokens if s * 1000 <= horizon]:
        del counters.tokens[second]
    used_tokens = sum(counters.tokens.values())
    oldest_second = min(counters.tokens, default=None)
    reset_tokens = oldest_second * 1000 + WINDOW_MS - now_ms if oldest_second is not None else 0
    count = len(counters.requests)
    reset_requests = counters.requests[0] + WINDOW_MS - now_ms if counters.requests else 0
    base = dict(rpm=rpm, tpm=tpm, reset_requests_ms=reset_requests, reset_tokens_ms=reset_tokens)
    if tpm > 0 and used_tokens >= tpm:
        return Admission("tokens", key_id, retry_after_ms=max(reset_tokens, 1), **base)
    if rpm > 0 and count >= rpm:
        return Admission("requests", key_id, retry_after_ms=max(reset_requests, 1), **base)
    if concurrent > 0 and counters.concurrent >= concurrent:
        return Admission("concurrent", key_id, retry_after_ms=1000, **base)
    counters.requests.append(now_ms)
    counters.concurrent += 1
    if not reset_requests:
        base["reset_requests_ms"] = WINDOW_MS
    return Admission(
        "ok",
        key_id,
        remaining_requests=max(rpm - count - 1, 0),
        remaining_tokens=max(tpm - used_tokens, 0),
        **base,
    )


# ---------------------------------------------------------------------------------------------
# Redis

_ADMIT = """
local prefix, key_hash, member = ARGV[1], ARGV[2], ARGV[3]
local now, window = tonumber(ARGV[4]), tonumber(ARGV[5])
local d_rpm, d_tpm, d_conc = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local conc_ttl = tonumber(ARGV[9])
local fields = redis.call('HGETALL', prefix .. 'key:' .. key_hash)
if #fields == 0 then return {'unknown'} end
local r = {}
for i = 1, #fields, 2 do r[fields[i]] = fields[i + 1] end
local id = r['id']
if r['revoked'] == '1' then return {'revoked', id} end
local function lim(v, d) if v == nil or v == '' then return d end return tonumber(v) end
local rpm, tpm = lim(r['rpm'], d_rpm), lim(r['tpm'], d_tpm)
local conc, budget = lim(r['concurrent'], d_conc), lim(r['budget'], 0)
if budget > 0 then
  local spent = tonumber(redis.call('GET', prefix .. 'spent:' .. id) or '0')
  if spent >= budget then return {'budget', id, rpm, 0, tpm, 0, 0, 0, 0} end
end
local horizon = now - window
local tok_key = prefix .. 'tok:' .. id
local used, oldest = 0, nil
local entries = redis.call('HGETALL', tok_key)
for i = 1, #entries, 2 do
  local second = tonumber(entries[i])
  if second * 1000 <= horizon then
    redis.call('HDEL', tok_key, entries[i])
  else
    used = used + tonumber(entries[i + 1])
    if oldest == nil or second < oldest then oldest = second end
  end
end
local reset_tok = 0
if oldest ~= nil then reset_tok = oldest * 1000 + window - now end
local req_key = prefix .. 'req:' .. id
redis.call('ZREMRANGEBYSCORE', req_key, '-inf', horizon)
local count = redis.call('ZCARD', req_key)
local reset_req = 0
if count > 0 then
  local first = redis.call('ZRANGE', req_key, 0, 0, 'WITHSCORES')
  reset_req = tonumber(first[2]) + window - now
end
if tpm > 0 and used >= tpm then
  return {'tokens', id, rpm, 0, tpm, 0, reset_req, reset_tok, math.max(reset_tok, 1)}
end
if rpm > 0 and count >= rpm then
  return {'requests', id, rpm, 0, tpm, 0, reset_req, reset_tok, math.max(reset_req, 1)}
end
local conc_key = prefix .. 'conc:' .. id
if conc > 0 and tonumber(redis.call('GET', conc_key) or '0') >= conc then
  return {'concurrent', id, rpm, 0, tpm, 0, reset_req, reset_tok, 1000}
end
redis.call('ZADD', req_key, now, member)
redis.call('PEXPIRE', req_key, window)
redis.call('INCR', conc_key)
redis.call('PEXPIRE', conc_key, conc_ttl)
if reset_req == 0 then reset_req = window end
return {'ok', id, rpm, math.max(rpm - count - 1, 0), tpm, math.max(tpm - used, 0),
        reset_req, reset_tok, 0}
"""

_SETTLE = """
local prefix, id = ARGV[1], ARGV[2]
local tokens, now, window = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local conc_key = prefix .. 'conc:' .. id
if tonumber(redis.call('GET', conc_key) or '0') > 0 then redis.call('DECR', conc_key) end
if tokens > 0 then
  local tok_key = prefix .. 'tok:' .. id
  redis.call('HINCRBY', tok_key, tostring(math.floor(now / 1000)), tokens)
  redis.call('PEXPIRE', tok_key, window + 1000)
  redis.call('INCRBY', prefix .. 'spent:' .. id, tokens)
end
return 1
"""

_PUT_KEY = """
local prefix, key_hash, id = ARGV[1], ARGV[2], ARGV[3]
local record = prefix .. 'key:' .. key_hash
redis.call('HSET', record, 'id', id, 'name', ARGV[4], 'created', ARGV[5], 'source', ARGV[6],
           'rpm', ARGV[7], 'tpm', ARGV[8], 'concurrent', ARGV[9], 'budget', ARGV[10])
redis.call('HSETNX', record, 'revoked', '0')
redis.call('SET', prefix .. 'keyid:' .. id, key_hash)
redis.call('SADD', prefix .. 'keys', key_hash)
return 1
"""


def _field(value: int | None) -> str:
    return "" if value is None else str(value)


def _record_from(fields: dict[bytes, bytes], key_hash: str) -> KeyRecord:
    text = {name.decode(): value.decode() for name, value in fields.items()}

    def number(name: str) -> int | None:
        return int(text[name]) if text.get(name) else None

    return KeyRecord(
        id=text["id"],
        key_hash=key_hash,
        name=text.get("name", ""),
        limits=KeyLimits(*(number(name) for name in LIMIT_FIELDS)),
        created=int(text.get("created") or 0),
        revoked=text.get("revoked") == "1",
        source=text.get("source", "admin"),
    )


class RedisQuota(QuotaStore):
    """Keys and counters in Redis, shared by every gateway that points at it."""

    def __init__(
        self, url: str, *, prefix: str = "switchyard:", concurrency_ttl_ms: int = 600_000
    ) -> None:
        import redis.asyncio as redis_asyncio

        self._redis = redis_asyncio.Redis.from_url(
            url, socket_connect_timeout=1.0, socket_timeout=2.0
        )
        self._prefix = prefix
        self._concurrency_ttl_ms = concurrency_ttl_ms
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)
        self._put = self._redis.register_script(_PUT_KEY)

    async def _run(self, coro):  # type: ignore[no-untyped-def]
        import redis

        try:
            return await coro
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise QuotaStoreUnavailable(f"Redis is unreachable: {exc}") from exc

    async def put_key(self, record: KeyRecord) -> None:
        limits = record.limits
        await self._run(
            self._put(
                args=[
                    self._prefix, record.key_hash, record.id, record.name, record.created,
                    record.source, _field(limits.rpm), _field(limits.tpm),
                    _field(limits.concurrent), _field(limits.budget),
                ]
            )
        )  # fmt: skip
        if record.revoked:
            await self._run(
                self._redis.hset(self._prefix + "key:" + record.key_hash, "revoked", "1")
            )

    async def _hash_of(self, key_id: str) -> str | None:
        found = await self._run(self._redis.get(self._prefix + "keyid:" + key_id))
        return found.decode() if found else None

    async def get_key(self, key_id: str) -> KeyRecord | None:
        key_hash = await self._hash_of(key_id)
        if key_hash is None:
            return None
        fields = await self._run(self._redis.hgetall(self._prefix + "key:" + key_hash))
        return _record_from(fields, key_hash) if fields else None

    async def list_keys(self) -> list[KeyRecord]:
        hashes = await self._run(self._redis.smembers(self._prefix + "keys"))
        records = []
        for raw in hashes:
            key_hash = raw.decode()
            fields = await self._run(self._redis.hgetall(self._prefix + "key:" + key_hash))
            if fields:
                records.append(_record_from(fields, key_hash))
        return sorted(records, key=lambda record: (record.created, record.id))

    async def update_key(
        self, key_id: str, *, limits: dict[str, int | None], revoked: bool | None
    ) -> KeyRecord | None:
        key_hash = await self._hash_of(key_id)
        if key_hash is None:
            return None
        mapping = {name: _field(value) for name, value in limits.items()}
        if revoked is not None:
            mapping["revoked"] = "1" if revoked else "0"
        if mapping:
            await self._run(self._redis.hset(self._prefix + "key:" + key_hash, mapping=mapping))
        return await self.get_key(key_id)

    async def spent(self, key_id: str) -> int:
        value = await self._run(self._redis.get(self._prefix + "spent:" + key_id))
        return int(value or 0)

    async def admit(
        self, key_hash: str, request_id: str, defaults: DefaultLimits, now_ms: int
    ) -> Admission:
        reply = await self._run(
            self._admit(
                args=[
                    self._prefix, key_hash, f"{now_ms}:{request_id}", now_ms, WINDOW_MS,
                    defaults.rpm, defaults.tpm, defaults.concurrent, self._concurrency_ttl_ms,
                ]
            )
        )  # fmt: skip
        status = reply[0].decode()
        if len(reply) == 1:
            return Admission(status)
        key_id = reply[1].decode()
        if len(reply) == 2:
            return Admission(status, key_id)
        numbers = [int(value) for value in reply[2:]]
        return Admission(status, key_id, *numbers)

    async def settle(self, key_id: str, tokens: int, now_ms: int) -> None:
        await self._run(self._settle(args=[self._prefix, key_id, tokens, now_ms, WINDOW_MS]))

    async def close(self) -> None:
        await self._redis.aclose()


def now_ms() -> int:
    return int(time.time() * 1000)
