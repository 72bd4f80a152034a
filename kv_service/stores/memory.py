"""The memory tier: blocks in a dict in LRU order, bounded by payload bytes."""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Sequence

from kv_service.keys import Block, BlockKey
from kv_service.stores.base import KVStore, TierStats


class MemoryStore(KVStore):
    """Keeps at most ``capacity_bytes`` of payload; the least recently put or read block is
    evicted first. Payloads are trusted here (they were checked on the way in), so reads skip
    the checksum."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()
        self._used_bytes = 0
        self._lock = threading.Lock()
        self._stats = TierStats("memory", capacity_bytes=capacity_bytes)

    @property
    def spec(self) -> str:
        return "memory"

    def put_many(self, blocks: Sequence[Block]) -> list[bool]:
        return [self._put(block) for block in blocks]

    def _put(self, block: Block) -> bool:
        size = len(block.payload)
        with self._lock:
            raw = block.key.raw
            if raw in self._blocks:
                self._blocks.move_to_end(raw)
                return True
            if size > self.capacity_bytes:
                self._stats.refused_writes += 1
                return False
            while self._used_bytes + size > self.capacity_bytes:
                _, evicted = self._blocks.popitem(last=False)
                self._used_bytes -= len(evicted.payload)
                self._stats.evictions += 1
            self._blocks[raw] = block
            self._used_bytes += size
            self._stats.bytes_written += size
            return True

    def get_many(self, keys: Sequence[BlockKey]) -> list[Block | None]:
        found: list[Block | None] = []
        with self._lock:
            for key in keys:
                block = self._blocks.get(key.raw)
                if block is None:
                    self._stats.misses += 1
                else:
                    self._blocks.move_to_end(key.raw)
                    self._stats.hits += 1
                    self._stats.bytes_read += len(block.payload)
                found.append(block)
        return found

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        with self._lock:
            for count, key in enumerate(keys):
                if key.raw not in self._blocks:
                    return count
        return len(keys)

    def delete_many(self, keys: Sequence[BlockKey]) -> int:
        deleted = 0
        with self._lock:
            for key in keys:
                block = self._blocks.pop(key.raw, None)
                if block is not None:
                    self._used_bytes -= len(block.payload)
                    deleted += 1
        return deleted

    def stats(self) -> list[TierStats]:
        with self._lock:
            return [
                dataclasses.replace(
                    self._stats, blocks=len(self._blocks), bytes_used=self._used_bytes
                )
            ]
