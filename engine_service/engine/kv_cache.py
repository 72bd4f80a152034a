"""KV memory: the block pool, per-request block tables, copy-on-write, and the prefix cache.

A request's KV lives in fixed-size blocks; its ``block_table`` maps logical block ``i``
(tokens ``i*B .. i*B+B-1``) to a physical block id in the pool::

    tokens     [0 ........ B-1][B ....... 2B-1][2B .. n-1   ]
    block_table[   7          ,    2          ,   11        ]   11 is partly filled
                 full, hashed    full, hashed    written by the coming steps

Full blocks are immutable: they get a hash chained over all tokens so far (plus extra keys
such as an adapter id, and the content hashes of the images whose placeholder tokens
they hold) and go into the radix prefix cache, from where other requests share
them by reference count. Only a request's last, partly filled block is ever written, and if
it is shared (a fork for n > 1) it is copied first (copy-on-write).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from engine_service.engine.prefix_cache import PrefixCacheListener, RadixPrefixCache
from engine_service.engine.request import Request
from switchyard.block_hash import block_extra_keys, extend_block_hashes, hash_block

__all__ = ["BlockPool", "KVCacheManager", "hash_block"]


class BlockPool:
    """Reference-counted block ids; unreferenced cached blocks wait in the prefix cache.

    A block with no references is either plainly free or cached-and-evictable. Allocation
    takes a plainly free block first and evicts the least recently used cached one after.
    """

    def __init__(self, num_blocks: int, prefix_cache: RadixPrefixCache | None) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._prefix_cache = prefix_cache

    @property
    def num_free(self) -> int:
        evictable = self._prefix_cache.num_evictable if self._prefix_cache else 0
        return len(self._free) + evictable

    def allocate(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            assert self._prefix_cache is not None
            block_id = self._prefix_cache.evict()
            if block_id is None:
                raise RuntimeError("KV block pool exhausted")
        self.ref_counts[block_id] = 1
        return block_id

    def incref(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0 and self._prefix_cache is not None:
            self._prefix_cache.mark_in_use(block_id)
        self.ref_counts[block_id] += 1

    def decref(self, block_id: int) -> None:
        count = self.ref_counts[block_id] - 1
        if count < 0:
            raise RuntimeError(f"block {block_id} released more often than it was taken")
        self.ref_counts[block_id] = count
        if count == 0:
            if self._prefix_cache is not None and self._prefix_cache.is_cached(block_id):
                self._prefix_cache.mark_evictable(block_id)
            else:
                self._free.append(block_id)

    def reset_prefix_cache(self) -> None:
        if self._prefix_cache is not None:
            self._free.extend(self._prefix_cache.clear_evictable())


class KVCacheManager:
    """Which blocks each request owns; the scheduler's only view of KV memory."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool,
        listeners: Sequence[PrefixCacheListener] = (),
    ) -> None:
        self.block_size = block_size
        self.prefix_cache = RadixPrefixCache(listeners) if enable_prefix_caching else None
        self.pool = BlockPool(num_blocks, self.prefix_cache)
        self._pending_copies: list[tuple[int, int]] = []
        self._pending_slot_copies: list[tuple[int, int]] = []

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> list[int]:
        """The cached blocks a new request can start from (no references taken).

        At least one prompt token is always left to compute, so that the step that finishes
        the prompt produces logits to sample from.
        """
        if self.prefix_cache is None:
            return []
        self._update_block_hashes(request)
        return self.prefix_cache.match(request.block_hashes[: self._max_cached_blocks(request)])

    def hashes_after_prefix(self, request: Request, num_cached_blocks: int) -> list[bytes]:
        """Hashes of the full blocks past the first ``num_cached_blocks`` that a lower tier
        could supply (call after :meth:`get_computed_blocks`)."""
        return request.block_hashes[num_cached_blocks : self._max_cached_blocks(request)]

    def _max_cached_blocks(self, request: Request) -> int:
        return (request.num_tokens - 1) // self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: list[int] | None = None,
        num_restored_blocks: int = 0,
    ) -> bool:
        """Make room for ``num_new_tokens`` more computed tokens; False (and no change) if
        the pool cannot hold them. ``computed_blocks`` (from :meth:`get_computed_blocks`,
        only for a request holding no blocks yet) are attached and count as computed.

        ``num_restored_blocks`` more blocks after them count as computed too: the caller
        fills them from an offload tier before the next forward pass. They are fresh blocks,
        ``block_table[len(computed_blocks) : len(computed_blocks) + num_restored_blocks]``,
        and enter the prefix cache when the step commits::

            block_table [ computed (shared) | restored (fresh) | new (fresh)      ]
            tokens      [ counted as computed at once           | this step's work ]
        """
        if not computed_blocks and not num_restored_blocks:
            # The common decode: the tokens fit in blocks the request already owns alone.
            table = request.block_table
            start = request.num_computed_tokens
            if (
                num_new_tokens > 0
                and start + num_new_tokens <= len(table) * self.block_size
                and (self.pool.ref_counts[table[start // self.block_size]] == 1)
            ):
                return True
        computed_blocks = computed_blocks or []
        num_computed = (
            request.num_computed_tokens
            + (len(computed_blocks) + num_restored_blocks) * self.block_size
        )
        num_held = len(request.block_table) + len(computed_blocks)
        num_new_blocks = max(0, self.blocks_needed(num_computed + num_new_tokens) - num_held)
        write_index = num_computed // self.block_size
        needs_copy = (
            num_new_tokens > 0
            and write_index < len(request.block_table)
            and self.pool.ref_counts[request.block_table[write_index]] > 1
        )
        revived = sum(1 for b in computed_blocks if self.pool.ref_counts[b] == 0)
        if num_new_blocks + int(needs_copy) > self.pool.num_free - revived:
            return False

        for block_id in computed_blocks:
            self.pool.incref(block_id)
        if computed_blocks or num_restored_blocks:
            # The scheduler counts these tokens as computed once admission succeeds.
            request.block_table.extend(computed_blocks)
            request.num_committed_blocks = len(request.block_table)
        if needs_copy:
            shared = request.block_table[write_index]
            private = self.pool.allocate()
            self._pending_copies.append((shared, private))
            self.pool.decref(shared)
            request.block_table[write_index] = private
        for _ in range(num_new_blocks):
            request.block_table.append(self.pool.allocate())
        return True

    def free(self, request: Request) -> None:
        """Release every block of the request, last block first, so that the tail of a
        conversation is evicted before its shared beginning."""
        for block_id in reversed(request.block_table):
            self.pool.decref(block_id)
        request.block_table = []
        request.num_committed_blocks = 0

    def fork(self, parent: Request, child: Request) -> None:
        """Give ``child`` the parent's blocks by reference (copy-on-write on first write)."""
        for block_id in parent.block_table:
            self.pool.incref(block_id)
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_committed_blocks = parent.num_committed_blocks

    def truncate(self, request: Request, num_tokens: int) -> None:
        """Keep the blocks that hold the first ``num_tokens`` tokens; free the rest, last
        first (rejected draft tokens' slots). Blocks already in the prefix cache are full
        and committed, so a truncation never reaches them::

            block_table [ committed | kept partial | freed ........ ]
                                    ^ num_tokens falls here
        """
        keep = self.blocks_needed(num_tokens)
        assert keep >= request.num_committed_blocks, "truncating into committed blocks"
        while len(request.block_table) > keep:
            self.pool.decref(request.block_table.pop())

    def commit_computed_blocks(self, request: Request, num_tokens: int | None = None) -> None:
        """Offer the request's newly completed full blocks to the prefix cache: those within
        its first ``num_tokens`` tokens (default: ``num_computed_tokens``), which must be
        known tokens whose KV is written."""
        if self.prefix_cache is None:
            return
        if num_tokens is None:
            num_tokens = request.num_computed_tokens
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        if num_full <= request.num_committed_blocks:
            return
        self._update_block_hashes(request)
        for i in range(request.num_committed_blocks, num_full):
            block_hash = request.block_hashes[i]
            existing = self.prefix_cache.cached_block(block_hash)
            if existing is not None and existing != request.block_table[i]:
                # Another request computed the same block at the same time. Switch to the
                # cached copy (same contents; full blocks are never written again) so that
                # this request's chain stays inside the tree and its own copy is freed.
                self.pool.incref(existing)
                self.pool.decref(request.block_table[i])
                request.block_table[i] = existing
            elif existing is None:
                parent_hash = request.block_hashes[i - 1] if i > 0 else None
                self.prefix_cache.insert(parent_hash, block_hash, request.block_table[i])
        request.num_committed_blocks = num_full

    def move_tokens(self, request: Request, moves: list[tuple[int, int]]) -> None:
        """Queue KV copies inside the request's own blocks, (from, to) cache indices: an
        accepted token-tree path is packed into consecutive positions. The engine has the
        runner do them as soon as the step is committed, before any freed block is reused."""
        size, table = self.block_size, request.block_table
        for src, dst in moves:
            self._pending_slot_copies.append(
                (table[src // size] * size + src % size, table[dst // size] * size + dst % size)
            )

    def take_slot_copies(self) -> list[tuple[int, int]]:
        copies, self._pending_slot_copies = self._pending_slot_copies, []
        return copies

    def take_block_copies(self) -> list[tuple[int, int]]:
        """(source, destination) block copies the model runner must do before the step."""
        copies, self._pending_copies = self._pending_copies, []
        return copies

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()

    def _update_block_hashes(self, request: Request) -> None:
        extend_block_hashes(
            request.block_hashes,
            request.all_token_ids,
            self.block_size,
            block_extra_keys(request.adapter_id, request.cache_salt),
            [image.span for image in request.mm_inputs],
        )
