"""The offload tiers inside one engine: the host tier, its bounds, and the KV events."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine_service.engine.kv_events import KVEventLog, KVTier
from engine_service.engine.offload import HostTier
from tests.engine_service.helpers import greedy, make_engine, make_llama_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("offload-ckpt")
    make_llama_checkpoint(path)
    return path


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 300) for _ in range(n)]


def _workload() -> list[list[int]]:
    """A shared 40-token system prompt, with unrelated prompts in between that push it out
    of a small device pool."""
    rng = random.Random(7)
    system = _tokens(rng, 40)
    return [
        system + _tokens(rng, 5),
        _tokens(rng, 45),
        system + _tokens(rng, 7),
        _tokens(rng, 45),
        system + _tokens(rng, 3),
    ]


def test_greedy_outputs_are_identical_when_blocks_come_back_from_the_host_tier(checkpoint):
    prompts = _workload()
    roomy = make_engine(checkpoint, num_kv_blocks=64)
    expected = [roomy.generate([p], greedy(8))[0][0] for p in prompts]

    # 16 blocks of 4 tokens: every unrelated prompt evicts the system prompt's blocks.
    engine = make_engine(
        checkpoint, num_kv_blocks=16, enable_kv_offload=True, kv_offload_host_bytes=1 << 20
    )
    assert [engine.generate([p], greedy(8))[0][0] for p in prompts] == expected

    stats = engine.stats()
    assert stats.offloaded_blocks > 0
    assert stats.restored_blocks_host > 0
    assert stats.host_hit_tokens == stats.restored_blocks_host * 4
    without = make_engine(checkpoint, num_kv_blocks=16)
    for p in prompts:
        without.generate([p], greedy(8))
    assert stats.recomputed_tokens == without.stats().recomputed_tokens - stats.host_hit_tokens


def test_restored_blocks_carry_the_offloaded_values(checkpoint):
    """Scrambling the host copies changes the output: the restored blocks are really read."""
    prompts = _workload()
    engine = make_engine(
        checkpoint, num_kv_blocks=16, enable_kv_offload=True, kv_offload_host_bytes=1 << 20
    )
    expected = engine.generate([prompts[0]], greedy(8))[0][0]
    engine.generate([prompts[1]], greedy(8))  # pushes the system prompt to the host tier
    assert engine.offload is not None
    engine.offload.local.host.normal_(std=10.0)  # type: ignore[union-attr]
    restored_before = engine.stats().restored_blocks_host
    assert engine.generate([prompts[0]], greedy(8))[0][0] != expected
    assert engine.stats().restored_blocks_host > restored_before


def test_host_tier_evicts_least_recently_used_but_never_a_held_slot():
    tier = HostTier(2)
    slot_a, _ = tier.reserve(b"a")
    slot_b, _ = tier.reserve(b"b")
    assert tier.lookup(b"a") == slot_a  # a is now the most recently used
    slot_c, evicted = tier.reserve(b"c")
    assert (slot_c, evicted) == (slot_b, b"b")
    tier.hold(slot_a)
    tier.hold(slot_c)
    assert tier.reserve(b"d") == (None, None)
    tier.release(slot_a)
    assert tier.reserve(b"d") == (slot_a, b"a")
    assert b"a" not in tier and b"d" in tier


def test_kv_events_name_blocks_stored_and_moved_between_tiers(checkpoint):
    engine = make_engine(
        checkpoint,
        num_kv_blocks=16,
        enable_kv_offload=True,
        kv_offload_host_bytes=1 << 20,
        enable_kv_events=True,
    )
    assert isinstance(engine.kv_events, KVEventLog)
    prompts = _workload()
    engine.generate([prompts[0]], greedy(4))
    first = engine.kv_events.drain()
    assert [(e.stored, e.tier) for e in first] == [(True, KVTier.DEVICE)]
    engine.generate([prompts[1]], greedy(4))
    events = engine.kv_events.drain()
    evicted = {
        h for e in events if not e.stored and e.tier is KVTier.DEVICE for h in e.block_hashes
    }
    to_host = {h for e in events if e.stored and e.tier is KVTier.HOST for h in e.block_hashes}
    assert evicted and evicted <= set(first[0].block_hashes)
    assert evicted <= to_host
    held = engine.held_block_hashes()
    assert set(held[KVTier.HOST]) == to_host
