"""The Redis tier: one Redis string per block, pipelined, bounded by the server itself.

Keys are ``switchyard:kv:`` + the 32-byte raw block key; values are records (see
``stores.base``), checked on every read. Redis bounds the memory (its ``maxmemory`` and
eviction policy): a block it evicted, or one whose TTL ran out, is a miss; a write it refuses
(``OOM`` under ``noeviction``) is a refused put. When Redis is unreachable every read is a
miss and every write is refused; the store says so once in the log and once more when Redis
answers again.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from kv_service.keys import Block, BlockKey
from kv_service.stores.base import CorruptRecord, KVStore, TierStats, decode_record, encode_record

logger = logging.getLogger(__name__)

KEY_PREFIX = b"switchyard:kv:"


class RedisStore(KVStore):
    """Blocks in the Redis at ``url`` (``redis://host:port[/db]``). ``ttl_s > 0`` expires a
    block that long after it was written. Every call is one pipelined round trip; a call
    gives up after ``timeout_s`` (no retries: the caller recomputes instead)."""

    def __init__(self, url: str, ttl_s: float = 0.0, timeout_s: float = 2.0) -> None:
        self.url = url
        self.ttl_ms = round(ttl_s * 1000) if ttl_s > 0 else None
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._lock = threading.Lock()
        self._stats = TierStats("redis")
        self._reachable = True

    @property
    def spec(self) -> str:
        return self.url

    @staticmethod
    def _redis_key(key: BlockKey) -> bytes:
        return KEY_PREFIX + key.raw

    def _failed(self, exc: RedisError) -> None:
        with self._lock:
            self._stats.errors += 1
            was_reachable, self._reachable = self._reachable, False
        if was_reachable:
            logger.warning("redis %s unavailable, serving misses: %s", self.url, exc)

    def _answered(self) -> None:
        with self._lock:
            was_reachable, self._reachable = self._reachable, True
        if not was_reachable:
            logger.info("redis %s answers again", self.url)

    def put_many(self, blocks: Sequence[Block]) -> list[bool]:
        if not blocks:
            return []
        pipe = self._client.pipeline(transaction=False)
        records = [encode_record(block) for block in blocks]
        for block, record in zip(blocks, records, strict=True):
            pipe.set(self._redis_key(block.key), record, px=self.ttl_ms)
        try:
            replies = pipe.execute(raise_on_error=False)
        except RedisError as exc:
            self._failed(exc)
            with self._lock:
                self._stats.refused_writes += len(blocks)
            return [False] * len(blocks)
        self._answered()
        stored = [reply is True for reply in replies]
        refusals = [reply for reply in replies if reply is not True]
        if refusals:
            logger.warning("redis refused %d writes: %s", len(refusals), refusals[0])
        with self._lock:
            self._stats.refused_writes += len(refusals)
            self._stats.bytes_written += sum(
                len(record) for record, ok in zip(records, stored, strict=True) if ok
            )
        return stored

    def get_many(self, keys: Sequence[BlockKey]) -> list[Block | None]:
        if not keys:
            return []
        try:
            records = self._client.mget([self._redis_key(key) for key in keys])
        except RedisError as exc:
            self._failed(exc)
            with self._lock:
                self._stats.misses += len(keys)
            return [None] * len(keys)
        self._answered()
        found: list[Block | None] = []
        corrupt: list[BlockKey] = []
        for key, record in zip(keys, records, strict=True):
            block = None
            if record is not None:
                try:
                    block = decode_record(key, record)
                except CorruptRecord as exc:
                    logger.warning("corrupt block deleted from redis: %s", exc)
                    corrupt.append(key)
            found.append(block)
        if corrupt:
            self.delete_many(corrupt)
        with self._lock:
            for block, record in zip(found, records, strict=True):
                if block is None:
                    self._stats.misses += 1
                else:
                    self._stats.hits += 1
                    self._stats.bytes_read += len(record)
            self._stats.corrupt_blocks += len(corrupt)
        return found

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        if not keys:
            return 0
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self._redis_key(key))
        try:
            present = pipe.execute()
        except RedisError as exc:
            self._failed(exc)
            return 0
        self._answered()
        for count, exists in enumerate(present):
            if not exists:
                return count
        return len(keys)

    def delete_many(self, keys: Sequence[BlockKey]) -> int:
        if not keys:
            return 0
        try:
            deleted = int(self._client.delete(*(self._redis_key(key) for key in keys)))
        except RedisError as exc:
            self._failed(exc)
            return 0
        self._answered()
        return deleted

    def stats(self) -> list[TierStats]:
        """Counters kept here, plus the server's key count, memory use, ``maxmemory`` and
        evictions (the server's, since it started; they may include other users' keys)."""
        with self._lock:
            stats = dataclasses.replace(self._stats)
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.dbsize()
            pipe.info("memory")
            pipe.info("stats")
            num_keys, memory, server_stats = pipe.execute()
        except RedisError as exc:
            self._failed(exc)
            return [stats]
        self._answered()
        stats.blocks = int(num_keys)
        stats.bytes_used = int(memory.get("used_memory", 0))
        stats.capacity_bytes = int(memory.get("maxmemory", 0))
        stats.evictions = int(server_stats.get("evicted_keys", 0))
        return [stats]

    def close(self) -> None:
        self._client.close()
