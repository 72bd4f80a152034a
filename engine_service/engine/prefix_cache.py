"""The radix prefix cache: which full KV blocks hold which token prefixes, and what to evict.

Each node is one full block. Its key is the block's chained hash, which already covers every
token before it, so a child is found by its own hash and the tree is a radix tree over block
hashes (one edge per block)::

    root ─┬─ h(A)          blocks of "system prompt A", shared by every request using it
          │   └─ h(A,B) ─┬─ h(A,B,C)     turn 1 of one conversation
          │              └─ h(A,B,D)     another conversation with the same opening
          └─ h(E) ...

A node whose block no request references is *evictable*. Eviction takes the least recently
used evictable leaf, so a shared prefix outlives the conversations branching off it. Because
every request holds the whole chain from the root down to its last block, an evictable node's
descendants are evictable too, and some evictable leaf always exists.

Listeners hear of every block entering and leaving the tree: the offload tiers save an
evicted block before its memory is reused, and the KV event log tells gateways what this
replica holds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True, eq=False)
class RadixNode:
    block_hash: bytes
    block_id: int
    parent: RadixNode | None
    children: dict[bytes, RadixNode] = field(default_factory=dict)


class PrefixCacheListener(Protocol):
    """Told of each block entering (``block_cached``) and leaving (``block_evicted``) the
    cache. ``block_evicted`` runs before the block id is handed to a new owner, so the
    block still holds its content until the next forward pass."""

    def block_cached(self, block_hash: bytes, block_id: int) -> None: ...

    def block_evicted(self, block_hash: bytes, block_id: int) -> None: ...


class RadixPrefixCache:
    """Longest-prefix match over chained block hashes, with LRU eviction of unused leaves.

    Contract: the block pool calls :meth:`mark_evictable` when a cached block's reference
    count drops to zero and :meth:`mark_in_use` when it rises from zero; only evictable blocks
    are ever returned by :meth:`evict`.
    """

    def __init__(self, listeners: Sequence[PrefixCacheListener] = ()) -> None:
        self._listeners = tuple(listeners)
        self._root = RadixNode(block_hash=b"", block_id=-1, parent=None)
        self._by_hash: dict[bytes, RadixNode] = {}
        self._by_block: dict[int, RadixNode] = {}
        # block_id -> node, least recently used first.
        self._evictable: OrderedDict[int, RadixNode] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_hash)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def match(self, block_hashes: list[bytes]) -> list[int]:
        """Block ids of the longest cached prefix of ``block_hashes`` (takes no references)."""
        node = self._root
        block_ids: list[int] = []
        for block_hash in block_hashes:
            child = node.children.get(block_hash)
            if child is None:
                break
            block_ids.append(child.block_id)
            node = child
        return block_ids

    def contains(self, block_hash: bytes) -> bool:
        return block_hash in self._by_hash

    def cached_block(self, block_hash: bytes) -> int | None:
        """The block id cached under ``block_hash``, if any."""
        node = self._by_hash.get(block_hash)
        return None if node is None else node.block_id

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._by_block

    def insert(self, parent_hash: bytes | None, block_hash: bytes, block_id: int) -> bool:
        """Cache ``block_id`` as the block after ``parent_hash`` (None: the first block).

        Returns False, caching nothing, when the hash is already cached (another request
        computed the same block) or the parent is no longer in the tree.
        """
        if block_hash in self._by_hash or block_id in self._by_block:
            return False
        parent = self._root if parent_hash is None else self._by_hash.get(parent_hash)
        if parent is None:
            return False
        node = RadixNode(block_hash=block_hash, block_id=block_id, parent=parent)
        parent.children[block_hash] = node
        self._by_hash[block_hash] = node
        self._by_block[block_id] = node
        for listener in self._listeners:
            listener.block_cached(block_hash, block_id)
        return True

    def mark_evictable(self, block_id: int) -> None:
        node = self._by_block[block_id]
        self._evictable[block_id] = node
        self._evictable.move_to_end(block_id)

    def mark_in_use(self, block_id: int) -> None:
        self._evictable.pop(block_id, None)

    def evict(self) -> int | None:
        """Drop the least recently used evictable leaf; return its block id (None if none)."""
        for node in self._evictable.values():
            if not node.children:
                break
        else:
            return None
        block_id = node.block_id
        del self._evictable[block_id]
        self._remove(node)
        return block_id

    def block_hashes(self) -> list[bytes]:
        return list(self._by_hash)

    def block_hash_of(self, block_id: int) -> bytes | None:
        node = self._by_block.get(block_id)
        return None if node is None else node.block_hash

    def clear_evictable(self) -> list[int]:
        """Evict everything unreferenced; return the freed block ids."""
        freed = []
        while (block_id := self.evict()) is not None:
            freed.append(block_id)
        return freed

    def _remove(self, node: RadixNode) -> None:
        assert node.parent is not None
        del node.parent.children[node.block_hash]
        del self._by_hash[node.block_hash]
        del self._by_block[node.block_id]
        for listener in self._listeners:
            listener.block_evicted(node.block_hash, node.block_id)
