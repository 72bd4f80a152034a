"""Memory over disk: reads go through and promote, writes go to both tiers."""

from __future__ import annotations

from pathlib import Path

import pytest

from kv_service.stores import DiskStore, MemoryStore, TieredStore, open_store
from tests.kv_service.conftest import chain, keys


@pytest.fixture
def tiers(tmp_path: Path) -> tuple[TieredStore, MemoryStore, DiskStore]:
    upper, lower = MemoryStore(1 << 20), DiskStore(tmp_path, 1 << 20)
    return TieredStore(upper, lower), upper, lower


def test_writes_reach_both_tiers(tiers: tuple[TieredStore, MemoryStore, DiskStore]) -> None:
    store, upper, lower = tiers
    blocks = chain(2)
    store.put_many(blocks)
    assert upper.lookup(keys(blocks)) == lower.lookup(keys(blocks)) == 2


def test_a_block_found_below_is_promoted(
    tiers: tuple[TieredStore, MemoryStore, DiskStore],
) -> None:
    store, upper, lower = tiers
    blocks = chain(2)
    lower.put_many(blocks)
    assert store.get_many(keys(blocks)) == blocks
    assert upper.lookup(keys(blocks)) == 2
    store.get_many(keys(blocks))
    memory, disk = store.stats()
    assert (memory.hits, memory.misses, disk.hits) == (2, 2, 2)


def test_lookup_joins_runs_held_by_either_tier(
    tiers: tuple[TieredStore, MemoryStore, DiskStore],
) -> None:
    store, upper, lower = tiers
    blocks = chain(6)
    upper.put_many(blocks[0:2] + blocks[4:5])
    lower.put_many(blocks[2:4])
    assert store.lookup(keys(blocks)) == 5


def test_the_memory_tier_is_lost_on_restart_but_not_the_blocks(tmp_path: Path) -> None:
    blocks = chain(3)
    options = {"memory_bytes": 1 << 20, "disk_bytes": 1 << 20, "redis_ttl_s": 0.0}
    first = open_store(f"disk:{tmp_path}", default_disk_dir=tmp_path / "unused", **options)
    first.put_many(blocks)
    again = open_store(f"disk:{tmp_path}", default_disk_dir=tmp_path / "unused", **options)
    assert again.get_many(keys(blocks)) == blocks
    memory, disk = again.stats()
    assert (memory.misses, disk.hits) == (3, 3)


@pytest.mark.parametrize(
    ("spec", "described"),
    [
        ("memory", "memory"),
        ("disk", "memory+disk:{default}"),
        ("disk:{tmp}/blocks", "memory+disk:{tmp}/blocks"),
        ("redis://127.0.0.1:1/0", "memory+redis://127.0.0.1:1/0"),
    ],
)
def test_open_store_builds_what_the_spec_names(spec: str, described: str, tmp_path: Path) -> None:
    default = tmp_path / "kv"
    store = open_store(
        spec.format(tmp=tmp_path),
        memory_bytes=1 << 20,
        disk_bytes=1 << 20,
        redis_ttl_s=0.0,
        default_disk_dir=default,
    )
    assert store.spec == described.format(tmp=tmp_path, default=default)


def test_open_store_without_a_memory_tier_and_with_a_bad_spec(tmp_path: Path) -> None:
    options = {"memory_bytes": 0, "disk_bytes": 1 << 20, "redis_ttl_s": 0.0}
    assert isinstance(open_store("disk", default_disk_dir=tmp_path, **options), DiskStore)
    with pytest.raises(ValueError, match="unknown KV store"):
        open_store("s3://bucket", default_disk_dir=tmp_path, **options)
