"""The KV block pool, the radix prefix cache and the KV manager, driven by hand-made requests.

A "step" here is what the scheduler does to a sequence: ``allocate_slots`` for the tokens to
compute, count them computed (the scheduler owns that count), then ``commit_computed_blocks``.
"""

from __future__ import annotations

import pytest

from engine_service.engine.kv_cache import BlockPool, KVCacheManager, hash_block
from engine_service.engine.prefix_cache import RadixPrefixCache
from engine_service.engine.request import Request
from tests.engine_service.helpers import assert_pool_entirely_free, make_request

B = 4  # block size


def prompt(n: int, start: int = 10) -> list[int]:
    return list(range(start, start + n))


def compute(kv: KVCacheManager, request: Request, num_tokens: int) -> None:
    assert kv.allocate_slots(request, num_tokens)
    request.num_computed_tokens += num_tokens
    kv.commit_computed_blocks(request)


def admit(kv: KVCacheManager, request: Request) -> list[int]:
    """Start a new request from the prefix cache and compute the rest of its prompt."""
    cached = kv.get_computed_blocks(request)
    num_new = request.num_tokens - len(cached) * B
    assert kv.allocate_slots(request, num_new, cached)
    request.num_computed_tokens = len(cached) * B + num_new
    kv.commit_computed_blocks(request)
    return cached


def decode(kv: KVCacheManager, request: Request, token_id: int) -> None:
    request.all_token_ids.append(token_id)
    compute(kv, request, 1)


def fill_pool(kv: KVCacheManager) -> list[int]:
    """Take every block that can be had, one single-token request each; return their ids."""
    taken = []
    while kv.num_free_blocks:
        filler = make_request(f"filler-{len(taken)}", [1])
        assert kv.allocate_slots(filler, 1)
        taken.extend(filler.block_table)
    return taken


# -- sharing ----------------------------------------------------------------------------------


def test_same_prompt_shares_committed_full_blocks_by_reference_count():
    kv = KVCacheManager(num_blocks=16, block_size=B, enable_prefix_caching=True)
    first = make_request("a", prompt(10))
    admit(kv, first)

    second = make_request("b", prompt(10))
    cached = admit(kv, second)

    assert cached == first.block_table[:2]
    assert second.block_table[:2] == first.block_table[:2]
    assert [kv.pool.ref_counts[b] for b in cached] == [2, 2]
    # The partly filled last block is never shared between requests.
    assert second.block_table[2] != first.block_table[2]
    assert kv.pool.ref_counts[second.block_table[2]] == 1


def test_matched_blocks_lead_the_table_and_count_as_committed():
    kv = KVCacheManager(num_blocks=16, block_size=B, enable_prefix_caching=True)
    admit(kv, make_request("a", prompt(10)))
    second = make_request("b", prompt(10))

    cached = kv.get_computed_blocks(second)
    assert kv.allocate_slots(second, 2, cached)

    assert second.block_table[:2] == cached
    assert second.num_committed_blocks == 2
    assert len(second.block_table) == 3


def test_match_leaves_at_least_one_prompt_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=B, enable_prefix_caching=True)
    admit(kv, make_request("a", prompt(8)))  # exactly two full blocks, both cached

    second = make_request("b", prompt(8))

    assert len(kv.get_computed_blocks(second)) == 1


def test_uncommitted_blocks_are_not_matched():
    kv = KVCacheManager(num_blocks=16, block_size=B, enable_prefix_caching=True)
    first = make_request("a", prompt(9))
    assert kv.allocate_slots(first, 9)  # slots held, nothing computed yet

    assert kv.get_computed_blocks(make_request("b", prompt(9))) == []


# -- block identity ---------------------------------------------------------------------------


def test_chained_hash_differs_when_an_earlier_block_differs():
    kv = KVCacheManager(num_blocks=16, block_size=B, enable_prefix_caching=True)
    a = make_request("a", [1, 2, 3, 4, 50, 51, 52, 53, 0])
    b = make_request("b", [9, 2, 3, 4, 50, 51, 52, 53, 0])
    kv.get_computed_blocks(a)
    kv.get_computed_blocks(b)

    assert a.block_hashes[1] != b.block_hashes[1]
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(None, [9, 2, 3, 4])
    assert hash_block(b"p", [5, 6]) != hash_block(b"q", [5, 6])


def test_block_hash_is_stable():
    # Replicas and the KV store agree on block identity, so the hash is a pure function.
    assert hash_block(None, [1, 2, 3, 4]) == hash_block(None, [1, 2, 3, 4])
    assert hash_block(b"p", [5, 6], ("x", None)) == hash_block(b"p", [5, 6], ("x", None))


@pytest.mark.parametrize(
    ("cached_with", "asked_with", "shares"),
    [
        ({"adapter_id": "lora-a"}, {}, False),
        ({}, {"adapter_id": "lora-a"}, False),
        ({"adapter_id": "lora-a"}, {"adapter_id": "lora-b"}, False),
        ({"adapter_id": "lora-a"}, {"adapter_id": "lora-a"}, True),
        ({"cache_salt": "tenant-1"}, {}, False),
        ({"cache_salt": "tenant-1"}, {"cache_salt": "tenant-2"}, False),
        ({"cache_salt": "tenant-1"}, {"cache_salt": "tenant-1"}, True),
        ({"adapter_id": "x"}, {"cache_salt": "x"}, False),
    ],
)
def test_extra_keys_decide_who_shares_blocks(cached_with, asked_with, shares):
    kv = KVCacheManager(num_blocks=16, block_size=B, enable_prefix_caching=True)
    admit(kv, make_request("a", prompt(10), **cached_with))

    matched = kv.get_computed_blocks(make_request("b", prompt(10), **asked_with))

    assert len(matched) == (2 if shares else 0)


# -- copy-on-write ----------------------------------------------------------------------------


def forked_pair(kv: KVCacheManager, num_prompt_tokens: int) -> tuple[Request, Request]:
    parent = make_request("a", prompt(num_prompt_tokens))
    admit(kv, parent)
    child = parent.fork(1)
    kv.fork(parent, child)
    child.num_computed_tokens = parent.num_computed_tokens  # the scheduler's part of a fork
    return parent, child


def test_fork_shares_every_block_by_reference():
    kv = KVCacheManager(num_blocks=16, block_size=B, enable_prefix_caching=True)
    parent, child = forked_pair(kv, 6)

    assert child.block_table == parent.block_table
    assert child.block_hashes == parent.block_hashes
    assert all(kv.pool.ref_counts[b] == 2 for b in parent.block_table)


def test_appending_into_a_shared_partial_block_copies_it_first():
    kv = KVCacheManager(num_blocks=16, block_size=B, enable_prefix_caching=True)
    parent, child = forked_pair(kv, 6)
    full, partial = parent.block_table

    decode(kv, child, 7)

    private = child.block_table[1]
    assert private not in (full, partial)
    assert kv.take_block_copies() == [(partial, private)]
    assert kv.take_block_copies() == []  # taken once
    assert child.block_table[0] == full
    assert kv.pool.ref_counts[full] == 2  # full blocks stay shared
    assert kv.pool.ref_counts[partial] == 1
    assert kv.pool.ref_counts[private] == 1


def test_last_owner_of_a_formerly_shared_block_writes_in_place():
    kv = KVCacheManager(num_blocks=16, block_size=B, enable_prefix_caching=True)
    parent, child = forked_pair(kv, 6)
    decode(kv, child, 7)
    kv.take_block_copies()
    before = list(parent.block_table)

    decode(kv, parent, 8)

    assert parent.block_table == before
    assert kv.take_block_copies() == []


def test_fork_at_a_block_boundary_needs_no_copy():
    kv = KVCacheManager(num_blocks=16, block_size=B, enable_prefix_caching=True)
    parent, child = forked_pair(kv, 8)

    decode(kv, child, 7)
    decode(kv, parent, 8)

    assert kv.take_block_copies() == []
    assert child.block_table[:2] == parent.block_table[:2]
    assert child.block_table[2] != parent.block_table[2]


# -- eviction ---------------------------------------------------------------------------------


def test_tail_of_a_freed_request_is_evicted_before_its_head():
    kv = KVCacheManager(num_blocks=3, block_size=B, enable_prefix_caching=True)
    request = make_request("a", prompt(12))
    compute(kv, request, 12)  # three full, cached blocks
    head, middle, tail = request.block_table
    kv.free(request)

    assert fill_pool(kv) == [tail, middle, head]


def test_shared_prefix_outlives_the_branches_off_it():
    kv = KVCacheManager(num_blocks=4, block_size=B, enable_prefix_caching=True)
    shared = prompt(4)
    one = make_request("a", [*shared, 50, 51, 52, 53])
    two = make_request("b", [*shared, 60, 61, 62, 63])
    admit(kv, one)
    admit(kv, two)
    prefix = one.block_table[0]
    assert two.block_table[0] == prefix
    kv.free(two)
    kv.free(one)

    filler = make_request("filler", prompt(12, start=100))
    assert kv.allocate_slots(filler, 12)  # the free block and two evicted: both branches

    assert prefix not in filler.block_table
    assert len(kv.get_computed_blocks(make_request("c", [*shared, 70, 71]))) == 1


def test_eviction_never_takes_a_block_with_cached_descendants():
    cache = RadixPrefixCache()
    parent_hash, child_hash = hash_block(None, [1]), hash_block(hash_block(None, [1]), [2])
    cache.insert(None, parent_hash, 0)
    cache.insert(parent_hash, child_hash, 1)
    # The parent became unused first, so it is the least recently used.
    cache.mark_evictable(0)
    cache.mark_evictable(1)

    assert cache.evict() == 1
    assert cache.evict() == 0
    assert cache.evict() is None


def test_a_referenced_block_is_never_evicted():
    kv = KVCacheManager(num_blocks=5, block_size=B, enable_prefix_caching=True)
    running = make_request("running", prompt(8))
    compute(kv, running, 8)  # two cached blocks, still referenced
    finished = make_request("finished", prompt(8, start=40))
    compute(kv, finished, 8)
    kv.free(finished)

    taken = fill_pool(kv)

    assert len(taken) == 3
    assert not set(taken) & set(running.block_table)
    assert [kv.pool.ref_counts[b] for b in running.block_table] == [1, 1]
    assert not kv.allocate_slots(make_request("late", [1]), 1)
    with pytest.raises(RuntimeError):
        kv.pool.allocate()


def test_a_block_computed_twice_at_once_leaves_the_pool_usable():
    """Two identical prompts in one step both miss the cache and compute the same blocks;
    only the first copy is cached. When the second diverges, its next full block must not be
    cached under the first one's blocks, or those blocks, once unreferenced, are counted free
    but can never be evicted (they are not leaves)."""
    kv = KVCacheManager(num_blocks=6, block_size=B, enable_prefix_caching=True)
    first, second = make_request("a", prompt(8)), make_request("b", prompt(8))
    for request in (first, second):
        assert kv.get_computed_blocks(request) == []
        assert kv.allocate_slots(request, 8)
    for request in (first, second):
        request.num_computed_tokens = 8
        kv.commit_computed_blocks(request)
    second.all_token_ids += [1, 2, 3, 4]
    compute(kv, second, 4)
    kv.free(first)
    assert kv.num_free_blocks == 3  # one never used, and the first request's two

    # Every block the pool counts as free can be had.
    for i in range(3):
        assert kv.allocate_slots(make_request(f"filler-{i}", [1]), 1)


# -- reference counts and failure without side effects ----------------------------------------


def test_releasing_a_block_twice_raises_and_count_stays_at_zero():
    pool = BlockPool(4, RadixPrefixCache())
    block = pool.allocate()
    pool.decref(block)

    with pytest.raises(RuntimeError):
        pool.decref(block)
    assert pool.ref_counts[block] == 0
    assert pool.num_free == 4


def test_allocate_slots_fails_without_side_effects_when_the_pool_is_too_small():
    kv = KVCacheManager(num_blocks=3, block_size=B, enable_prefix_caching=True)
    request = make_request("a", prompt(13))

    assert not kv.allocate_slots(request, 13)

    assert request.block_table == []
    assert request.num_computed_tokens == 0
    assert_pool_entirely_free(kv)


def test_failed_allocate_slots_takes_no_reference_on_matched_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=B, enable_prefix_caching=True)
    finished = make_request("a", prompt(8))
    compute(kv, finished, 8)
    kv.free(finished)
    longer = make_request("b", prompt(30))
    cached = kv.get_computed_blocks(longer)
    assert len(cached) == 2

    assert not kv.allocate_slots(longer, 22, cached)

    assert longer.block_table == []
    assert longer.num_computed_tokens == 0
    assert_pool_entirely_free(kv)
    assert kv.get_computed_blocks(make_request("c", prompt(9))) == cached


def test_failed_copy_on_write_leaves_the_shared_block_alone():
    kv = KVCacheManager(num_blocks=2, block_size=B, enable_prefix_caching=True)
    _, child = forked_pair(kv, 6)
    before = list(child.block_table)
    child.all_token_ids.append(7)

    assert not kv.allocate_slots(child, 1)  # the copy needs a block and none is free

    assert child.block_table == before
    assert kv.take_block_copies() == []
    assert [kv.pool.ref_counts[b] for b in before] == [2, 2]


# -- everything comes back --------------------------------------------------------------------


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_pool_is_entirely_free_after_every_request_ends(enable_prefix_caching):
    kv = KVCacheManager(num_blocks=16, block_size=B, enable_prefix_caching=enable_prefix_caching)
    first = make_request("a", prompt(10))
    second = make_request("b", [*prompt(8), 90, 91, 92])
    admit(kv, first)
    admit(kv, second)
    child = first.fork(1)
    kv.fork(first, child)
    for token in range(6):  # both samples cross a block boundary after copy-on-write
        decode(kv, first, 100 + token)
        decode(kv, child, 200 + token)
        decode(kv, second, 300 + token)
    assert kv.take_block_copies()

    for request in (second, child, first):
        kv.free(request)

    assert_pool_entirely_free(kv)


def test_reset_prefix_cache_returns_every_unreferenced_cached_block():
    kv = KVCacheManager(num_blocks=8, block_size=B, enable_prefix_caching=True)
    request = make_request("a", prompt(12))
    compute(kv, request, 12)
    kv.free(request)

    kv.reset_prefix_cache()

    assert len(kv.prefix_cache) == 0
    assert kv.get_computed_blocks(make_request("b", prompt(12))) == []
    assert_pool_entirely_free(kv)
