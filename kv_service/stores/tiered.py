"""A memory tier over a slower one (disk or Redis): read-through with promotion,
write-through."""

from __future__ import annotations

from collections.abc import Sequence

from kv_service.keys import Block, BlockKey
from kv_service.stores.base import KVStore, TierStats


class TieredStore(KVStore):
    """``upper`` (fast, small) over ``lower`` (slow, large).

    A read tries ``upper`` first and asks ``lower`` only for what missed there; blocks found
    below are copied up. A write goes to both, so losing ``upper`` (a restart) loses nothing
    that ``lower`` kept. A block counts as stored when either tier took it.
    """

    def __init__(self, upper: KVStore, lower: KVStore) -> None:
        self.upper = upper
        self.lower = lower

    @property
    def spec(self) -> str:
        return f"{self.upper.spec}+{self.lower.spec}"

    def put_many(self, blocks: Sequence[Block]) -> list[bool]:
        below = self.lower.put_many(blocks)
        above = self.upper.put_many(blocks)
        return [a or b for a, b in zip(above, below, strict=True)]

    def get_many(self, keys: Sequence[BlockKey]) -> list[Block | None]:
        found = self.upper.get_many(keys)
        missed = [i for i, block in enumerate(found) if block is None]
        if not missed:
            return found
        from_below = self.lower.get_many([keys[i] for i in missed])
        promoted = []
        for i, block in zip(missed, from_below, strict=True):
            if block is not None:
                found[i] = block
                promoted.append(block)
        if promoted:
            self.upper.put_many(promoted)
        return found

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        # A key counts when either tier has it, so alternate: the run present above, then the
        # run present below, until neither tier extends the prefix.
        count = 0
        while count < len(keys):
            run = self.upper.lookup(keys[count:]) or self.lower.lookup(keys[count:])
            if run == 0:
                break
            count += run
        return count

    def delete_many(self, keys: Sequence[BlockKey]) -> int:
        deleted = 0
        for key in keys:
            removed = self.upper.delete_many([key]) + self.lower.delete_many([key])
            deleted += removed > 0
        return deleted

    def stats(self) -> list[TierStats]:
        return self.upper.stats() + self.lower.stats()

    def close(self) -> None:
        self.upper.close()
        self.lower.close()
