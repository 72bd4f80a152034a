"""Every store keeps the same contract: put, get, lookup, delete, by fingerprint and hash."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kv_service.stores import DiskStore, KVStore, MemoryStore, RedisStore, TieredStore
from kv_service.stores.base import RECORD_HEADER_BYTES
from tests.kv_service.conftest import OTHER_FINGERPRINT, StartRedis, chain, keys, make_block

KINDS = ["memory", "disk", "redis", "memory+disk", "memory+redis"]


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KVStore]:
    def lower(kind: str) -> KVStore:
        if kind == "disk":
            return DiskStore(tmp_path / "kv", 1 << 30)
        start_redis: StartRedis = request.getfixturevalue("start_redis")
        return RedisStore(start_redis())

    kind: str = request.param
    if kind == "memory":
        built: KVStore = MemoryStore(1 << 30)
    elif kind.startswith("memory+"):
        built = TieredStore(MemoryStore(1 << 30), lower(kind.removeprefix("memory+")))
    else:
        built = lower(kind)
    yield built
    built.close()


def test_put_then_get_returns_the_same_bytes(store: KVStore) -> None:
    blocks = chain(3)
    assert store.put_many(blocks) == [True, True, True]
    assert store.get_many(keys(blocks)) == blocks


def test_get_of_absent_keys_is_a_miss_in_place(store: KVStore) -> None:
    blocks = chain(3)
    store.put_many([blocks[0], blocks[2]])
    assert store.get_many(keys(blocks)) == [blocks[0], None, blocks[2]]


def test_putting_a_present_key_again_keeps_one_copy(store: KVStore) -> None:
    block = make_block(0)
    assert store.put_many([block]) == [True]
    assert store.put_many([block]) == [True]
    assert sum(tier.blocks for tier in store.stats()[-1:]) == 1


def test_lookup_counts_the_leading_present_blocks_of_a_chain(store: KVStore) -> None:
    blocks = chain(6)
    store.put_many(blocks[:3] + blocks[4:])
    assert store.lookup(keys(blocks)) == 3
    assert store.lookup(keys(blocks[4:])) == 2
    assert store.lookup(keys(blocks[3:])) == 0
    assert store.lookup([]) == 0


def test_another_fingerprint_never_sees_the_block(store: KVStore) -> None:
    mine = make_block(0)
    theirs = make_block(0, fingerprint=OTHER_FINGERPRINT)  # same chained hash, other model
    assert mine.key.block_hash == theirs.key.block_hash
    store.put_many([mine])
    assert store.lookup([theirs.key]) == 0
    assert store.get_many([theirs.key]) == [None]


def test_delete_removes_and_counts_what_was_there(store: KVStore) -> None:
    blocks = chain(3)
    store.put_many(blocks[:2])
    assert store.delete_many(keys(blocks)) == 2
    assert store.get_many(keys(blocks)) == [None, None, None]
    assert store.lookup(keys(blocks)) == 0


def test_hits_and_misses_are_counted_per_tier(store: KVStore) -> None:
    blocks = chain(2)
    store.put_many(blocks[:1])
    store.get_many(keys(blocks))
    top = store.stats()[0]
    assert (top.hits, top.misses) == (1, 1)
    assert top.hit_rate == 0.5
    assert top.bytes_read >= 1024


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_least_recently_used_block_is_evicted_first(kind: str, tmp_path: Path) -> None:
    blocks = chain(4)
    store: KVStore
    if kind == "memory":
        store = MemoryStore(3 * 1024)
    else:
        store = DiskStore(tmp_path / "kv", 3 * (1024 + RECORD_HEADER_BYTES))
    store.put_many(blocks[:3])
    store.get_many([blocks[0].key])  # 0 is now more recent than 1
    store.put_many([blocks[3]])
    assert store.get_many(keys(blocks)) == [blocks[0], None, blocks[2], blocks[3]]
    stats = store.stats()[0]
    assert stats.evictions == 1
    assert stats.bytes_used <= stats.capacity_bytes


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_a_block_larger_than_the_store_is_refused(kind: str, tmp_path: Path) -> None:
    store: KVStore = MemoryStore(4096) if kind == "memory" else DiskStore(tmp_path, 4096)
    small, large = make_block(0), make_block(1, size=8192)
    store.put_many([small])
    assert store.put_many([large]) == [False]
    assert store.get_many([small.key, large.key]) == [small, None]
    assert store.stats()[0].refused_writes == 1
