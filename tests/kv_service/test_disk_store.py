"""The disk store survives restarts, never serves a damaged record, and refuses writes
cleanly when the disk is full."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from kv_service.stores import DiskStore
from kv_service.stores.base import RECORD_HEADER_BYTES
from tests.kv_service.conftest import chain, keys, make_block

RECORD = 1024 + RECORD_HEADER_BYTES


def block_files(root: Path) -> list[Path]:
    return sorted(root.glob("??/*.blk"))


def test_a_new_store_over_the_same_folder_serves_the_blocks(tmp_path: Path) -> None:
    blocks = chain(5)
    DiskStore(tmp_path, 1 << 20).put_many(blocks)

    reopened = DiskStore(tmp_path, 1 << 20)
    assert reopened.lookup(keys(blocks)) == 5
    assert reopened.get_many(keys(blocks)) == blocks
    assert reopened.stats()[0].bytes_used == 5 * RECORD


def test_recency_survives_a_restart(tmp_path: Path) -> None:
    blocks = chain(3)
    store = DiskStore(tmp_path, 1 << 20)
    for block in blocks:
        store.put_many([block])
    os.utime(store._path(blocks[1].key), ns=(1, 1))  # the oldest access
    reopened = DiskStore(tmp_path, 2 * RECORD)  # a smaller bound evicts on start
    assert reopened.get_many(keys(blocks)) == [blocks[0], None, blocks[2]]


def test_leftover_temp_files_are_removed_on_start(tmp_path: Path) -> None:
    DiskStore(tmp_path, 1 << 20)
    (tmp_path / "tmp" / "crashed-write.tmp").write_bytes(b"half a record")
    DiskStore(tmp_path, 1 << 20)
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:], id="flip"),
        pytest.param(lambda data: data[:-1], id="truncate-payload"),
        pytest.param(lambda data: data[:10], id="truncate-header"),
        pytest.param(lambda data: data + b"\x00", id="trailing-bytes"),
    ],
)
def test_a_damaged_record_is_a_miss_and_is_deleted(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    blocks = chain(2)
    store = DiskStore(tmp_path, 1 << 20)
    store.put_many(blocks)
    path = store._path(blocks[0].key)
    path.write_bytes(damage(path.read_bytes()))

    assert store.get_many(keys(blocks)) == [None, blocks[1]]
    assert not path.exists()
    assert store.lookup(keys(blocks)) == 0
    stats = store.stats()[0]
    assert stats.corrupt_blocks == 1
    assert stats.bytes_used == RECORD


def test_a_record_moved_under_another_name_is_not_served(tmp_path: Path) -> None:
    first, second = chain(2)
    store = DiskStore(tmp_path, 1 << 20)
    store.put_many([first, second])
    store._path(first.key).write_bytes(store._path(second.key).read_bytes())
    assert store.get_many([first.key]) == [None]


def test_disk_full_refuses_the_write_and_keeps_the_old_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = chain(2)
    store = DiskStore(tmp_path, 1 << 20)
    store.put_many(old)
    real_write = os.write
    calls = 0

    def write_then_fill_up(fd: int, data: bytes | memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(data)[: len(data) // 2])  # a partial write first

    new = make_block(7)
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", write_then_fill_up)
        assert store.put_many([new]) == [False]

    assert calls == 2
    assert store.get_many([new.key, *keys(old)]) == [None, *old]
    assert list((tmp_path / "tmp").iterdir()) == []
    assert len(block_files(tmp_path)) == 2
    stats = store.stats()[0]
    assert (stats.refused_writes, stats.errors, stats.bytes_used) == (1, 1, 2 * RECORD)
    assert store.put_many([new]) == [True]  # space came back
    assert DiskStore(tmp_path, 1 << 20).get_many([new.key]) == [new]


def test_bound_is_kept_across_many_writes(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 10 * RECORD)
    store.put_many(chain(25))
    used = sum(path.stat().st_size for path in block_files(tmp_path))
    assert used == store.stats()[0].bytes_used == 10 * RECORD
    assert store.stats()[0].evictions == 15
