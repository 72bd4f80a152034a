"""The Redis store against a real redis-server: TTL, maxmemory, damage, and Redis going away."""

from __future__ import annotations

import time

import redis

from kv_service.stores import RedisStore
from kv_service.stores.redis_store import KEY_PREFIX
from tests.kv_service.conftest import StartRedis, chain, keys, make_block


def test_blocks_expire_after_the_ttl(start_redis: StartRedis) -> None:
    store = RedisStore(start_redis(), ttl_s=0.3)
    blocks = chain(2)
    store.put_many(blocks)
    assert store.get_many(keys(blocks)) == blocks
    time.sleep(0.5)
    assert store.lookup(keys(blocks)) == 0
    assert store.get_many(keys(blocks)) == [None, None]


def test_without_ttl_blocks_do_not_expire(start_redis: StartRedis) -> None:
    url = start_redis()
    RedisStore(url).put_many([make_block(0)])
    assert redis.Redis.from_url(url).ttl(KEY_PREFIX + make_block(0).key.raw) == -1


def test_redis_evicts_under_maxmemory_and_evicted_blocks_are_misses(
    start_redis: StartRedis,
) -> None:
    store = RedisStore(start_redis("--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"))
    blocks = chain(40, size=128 * 1024)  # 5 MiB into 2 MiB
    for block in blocks:
        assert store.put_many([block]) == [True]
    found = store.get_many(keys(blocks))
    assert found[-1] == blocks[-1]
    assert found[0] is None
    assert all(got in (None, want) for got, want in zip(found, blocks))
    stats = store.stats()[0]
    assert stats.evictions > 0
    assert stats.capacity_bytes == 2 * 1024 * 1024


def test_a_full_redis_without_eviction_refuses_writes_cleanly(start_redis: StartRedis) -> None:
    store = RedisStore(start_redis("--maxmemory", "2mb", "--maxmemory-policy", "noeviction"))
    results = [store.put_many([block]) for block in chain(40, size=128 * 1024)]
    assert [True] in results and [False] in results
    assert store.stats()[0].refused_writes == results.count([False])
    kept = chain(1, size=128 * 1024)
    assert store.get_many(keys(kept)) == kept


def test_a_damaged_value_is_a_miss_and_is_deleted(start_redis: StartRedis) -> None:
    url = start_redis()
    store = RedisStore(url)
    blocks = chain(2)
    store.put_many(blocks)
    raw = redis.Redis.from_url(url)
    name = KEY_PREFIX + blocks[0].key.raw
    raw.set(name, raw.get(name)[:-5])  # truncated
    assert store.get_many(keys(blocks)) == [None, blocks[1]]
    assert raw.exists(name) == 0
    assert store.stats()[0].corrupt_blocks == 1


def test_redis_down_means_fast_misses_and_recovery_when_it_returns(
    start_redis: StartRedis,
) -> None:
    url = start_redis()
    store = RedisStore(url, timeout_s=0.5)
    blocks = chain(2)
    store.put_many(blocks[:1])
    redis.Redis.from_url(url).shutdown(nosave=True)

    started = time.monotonic()
    assert store.get_many(keys(blocks)) == [None, None]
    assert store.lookup(keys(blocks)) == 0
    assert store.put_many(blocks) == [False, False]
    assert store.delete_many(keys(blocks)) == 0
    assert time.monotonic() - started < 2.0
    assert store.stats()[0].errors >= 4

    port = int(url.removesuffix("/0").rsplit(":", 1)[1])
    assert start_redis(port=port) == url
    assert store.put_many(blocks) == [True, True]
    assert store.get_many(keys(blocks)) == blocks
