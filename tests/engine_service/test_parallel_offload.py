"""KV offload on parallel engines (gloo, two processes): every rank offloads and restores its
own share of each block as rank 0 decides, and the KV service keeps each rank's share under
a fingerprint of its own.

The test process is rank 0; each parallel engine starts its other rank as a child process,
and the KV service runs in a thread of the test process (the other rank reaches it over
gRPC like rank 0).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine_service.engine import EngineConfig, LLMEngine
from engine_service.engine.kv_events import KVEventLog, KVTier, SharedKVEvents
from engine_service.engine.offload import RemoteKVStore
from engine_service.engine.offload_rank import rank_kv_fingerprint
from engine_service.kv_connector import KVServiceStore
from engine_service.layers.parallel import TensorParallel, kv_shard
from switchyard.block_hash import chained_block_hashes
from switchyard.fingerprint import checkpoint_id, kv_fingerprint
from switchyard.kv_client import KVClientSync
from tests.engine_service.deepseek_checkpoints import make_deepseek_checkpoint
from tests.engine_service.helpers import greedy, make_engine, make_llama_checkpoint
from tests.engine_service.test_cross_replica import (  # noqa: F401 - the fixture
    KVServiceThread,
    free_port,
    kv_service,
    wait_for,
)
from tests.engine_service.test_offload import _workload

BLOCK = 4
rng = random.Random(23)
SYSTEM_1 = [rng.randrange(3, 300) for _ in range(40)]
SYSTEM_2 = [rng.randrange(3, 300) for _ in range(40)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two layers, two key/value heads: one head per rank at TP=2."""
    path = tmp_path_factory.mktemp("parallel-offload-ckpt")
    make_llama_checkpoint(path)
    return path


def one_rank_tokens(checkpoint: Path, prompts: list[list[int]], max_tokens: int = 8):
    """What one rank without offload answers, prompt by prompt."""
    engine = make_engine(checkpoint)
    return [engine.generate([p], greedy(max_tokens))[0][0] for p in prompts]


def test_a_rank_caches_its_slice_of_the_heads_under_a_fingerprint_of_its_own():
    assert [kv_shard(4, r, 2) for r in range(2)] == [(0, True), (1, True)]
    # One replicated head (or DeepSeek's latent): one slice, stored by its first rank.
    assert [kv_shard(1, r, 2) for r in range(2)] == [(0, True), (0, False)]
    assert [kv_shard(2, r, 4) for r in range(4)] == [(0, True), (0, False), (1, True), (1, False)]
    shape = (2, 2, BLOCK, 1, 16)
    one_rank = kv_fingerprint("m", "float32", shape)
    assert one_rank == kv_fingerprint("m", "float32", shape, tp_size=1, kv_shard=0)
    slices = {kv_fingerprint("m", "float32", shape, 2, s) for s in (0, 1)}
    assert len(slices) == 2 and one_rank not in slices
    assert kv_fingerprint("m", "float32", shape, 4, 1) not in slices


class InProcessStore(RemoteKVStore):
    """A store that exists in this process only (no ``reopen_spec``); never called."""

    def lookup(self, fingerprint, block_hashes):
        raise AssertionError("not reached")

    get = put = lookup


def test_a_store_the_other_ranks_cannot_open_is_refused_with_the_reason(checkpoint):
    config = EngineConfig(
        model=str(checkpoint), enable_kv_offload=True, tensor_parallel_size=2, num_kv_blocks=8
    )
    with pytest.raises(ValueError, match="cannot be opened by the engine's other ranks"):
        LLMEngine(config, InProcessStore())


def test_data_parallel_pools_report_a_host_block_once_until_the_last_lets_it_go():
    log = KVEventLog()
    pools = SharedKVEvents(log)
    pools.record(True, KVTier.HOST, b"a")
    pools.record(True, KVTier.HOST, b"a")  # the other pool's host tier
    pools.block_cached(b"a", 3)  # the device tier counts apart
    pools.record(False, KVTier.HOST, b"a")
    assert [(e.stored, e.tier, e.block_hashes) for e in log.drain()] == [
        (True, KVTier.HOST, [b"a"]),
        (True, KVTier.DEVICE, [b"a"]),
    ]
    pools.record(False, KVTier.HOST, b"a")
    assert [(e.stored, e.tier) for e in log.drain()] == [(False, KVTier.HOST)]


def test_tensor_parallel_ranks_restore_their_shares_from_the_host_tier(checkpoint):
    prompts = _workload()
    expected = one_rank_tokens(checkpoint, prompts)
    # 16 blocks of 4 tokens: every unrelated prompt evicts the system prompt's blocks, and
    # overwrites them on both ranks before they come back.
    engine = make_engine(
        checkpoint,
        num_kv_blocks=16,
        enable_kv_offload=True,
        kv_offload_host_bytes=1 << 20,
        enable_kv_events=True,
        tensor_parallel_size=2,
    )
    try:
        assert [engine.generate([p], greedy(8))[0][0] for p in prompts] == expected
        stats = engine.stats()
        held = engine.held_block_hashes()
        assert engine.kv_events is not None
        events = engine.kv_events.drain()
    finally:
        engine.close()
    assert stats.restored_blocks_host > 0
    assert stats.host_hit_tokens == stats.restored_blocks_host * BLOCK
    # Rank 0 alone reports blocks, whole: each entered the (roomy) host tier once.
    to_host = [h for e in events if e.stored and e.tier is KVTier.HOST for h in e.block_hashes]
    assert len(to_host) == len(set(to_host)) == stats.offloaded_blocks
    assert set(to_host) == set(held[KVTier.HOST])


def test_data_parallel_ranks_offload_and_restore_each_their_own_pool(checkpoint):
    """Two prompts at a time go to the two ranks (the least loaded takes the next); each
    rank's system prompt is pushed out of its pool and comes back from its host tier."""
    other = [rng.randrange(3, 300) for _ in range(40)]
    pairs = [
        ([*SYSTEM_1, 5, 6], [*other, 7]),
        ([rng.randrange(3, 300) for _ in range(45)], [rng.randrange(3, 300) for _ in range(45)]),
        ([*SYSTEM_1, 8, 9, 10], [*other, 11, 12]),
    ]
    expected = [one_rank_tokens(checkpoint, list(pair)) for pair in pairs]
    engine = make_engine(
        checkpoint,
        num_kv_blocks=16,
        enable_kv_offload=True,
        kv_offload_host_bytes=1 << 20,
        data_parallel_size=2,
    )
    try:
        got = [[s[0] for s in engine.generate(list(pair), greedy(8))] for pair in pairs]
        restored = [shard.offload.stats.restored_blocks_host for shard in engine._shards]
        stats = engine.stats()
    finally:
        engine.close()
    assert got == expected
    assert all(n > 0 for n in restored), restored
    assert stats.restored_blocks_host == sum(restored)


def remote_engine(checkpoint: Path, port: int, **config: object) -> LLMEngine:
    settings = {
        "num_kv_blocks": 64,
        "block_size": BLOCK,
        "enable_kv_offload": True,
        "kv_offload_host_bytes": 1 << 20,
        **config,
    }
    engine_config = EngineConfig(model=str(checkpoint), dtype="float32", **settings)  # type: ignore[arg-type]
    return LLMEngine(engine_config, KVServiceStore(f"127.0.0.1:{port}", timeout_s=1.0))


def rank_fingerprint(checkpoint: Path, tp_rank: int) -> bytes:
    """Rank ``tp_rank``'s fingerprint in a TP=2 engine of the two-head checkpoint."""
    return kv_fingerprint(
        checkpoint_id(checkpoint), torch.float32, (2, 2, BLOCK, 1, 16), 2, tp_rank
    )


def test_tensor_parallel_engines_share_each_ranks_blocks_and_one_rank_reads_none(
    checkpoint,
    kv_service,  # noqa: F811 - the fixture imported above
    tmp_path,
):
    port = free_port()
    kv_service.start("memory", port, tmp_path)
    prompts = [[*SYSTEM_1, 17, 18, 19], [*SYSTEM_2, 20, 21], [*SYSTEM_1, 40, 41, 42, 43]]
    reads = [[*SYSTEM_1, 40, 41, 42, 43], [*SYSTEM_2, 50, 51, 52]]
    expected = one_rank_tokens(checkpoint, reads)
    writer = remote_engine(checkpoint, port, tensor_parallel_size=2)
    try:
        for prompt in prompts[:2]:
            writer.generate([prompt], greedy(4))
        wait_for(lambda: writer.stats().remote_put_blocks >= 2 * len(SYSTEM_1) // BLOCK)
    finally:
        writer.close()
    # Rank 1's share of the second system prompt is gone from block 4 on, rank 0's is whole.
    system_2 = chained_block_hashes(SYSTEM_2, BLOCK)
    client = KVClientSync(f"127.0.0.1:{port}", timeout_s=2.0)
    try:
        assert client.lookup(rank_fingerprint(checkpoint, 0), system_2) == len(system_2)
        assert client.lookup(rank_fingerprint(checkpoint, 1), system_2) == len(system_2)
        assert client.delete_blocks(rank_fingerprint(checkpoint, 1), system_2[4:]) == 6
    finally:
        client.close()

    reader = remote_engine(checkpoint, port, tensor_parallel_size=2)
    try:
        got = [reader.generate([p], greedy(8))[0][0] for p in reads]
        stats = reader.stats()
    finally:
        reader.close()
    assert got == expected
    # The first prefix whole from both ranks' shares; of the second, only what both hold.
    assert stats.restored_blocks_remote == len(SYSTEM_1) // BLOCK + 4
    assert stats.remote_hit_tokens == len(SYSTEM_1) + 4 * BLOCK

    single = remote_engine(checkpoint, port)  # one rank: another layout, nothing to read
    try:
        assert single.generate([reads[0]], greedy(8))[0][0] == expected[0]
        assert single.stats().remote_hit_tokens == 0
    finally:
        single.close()


def test_a_tensor_parallel_engine_serves_through_a_kv_service_outage(
    checkpoint,
    kv_service,  # noqa: F811 - the fixture imported above
    tmp_path,
):
    """Nothing listens at first: every rank's calls fail, the engine recomputes and answers
    right; once the service is up, every rank's puts go through again."""
    port = free_port()
    prompts = [[*SYSTEM_1, 17, 18, 19], [*SYSTEM_2, 20, 21]]
    expected = one_rank_tokens(checkpoint, prompts)
    engine = remote_engine(checkpoint, port, tensor_parallel_size=2, kv_remote_retry_s=1.0)
    try:
        assert engine.generate([prompts[0]], greedy(8))[0][0] == expected[0]
        wait_for(lambda: engine.stats().remote_errors > 0)
        assert not engine.stats().remote_available
        kv_service.start("memory", port, tmp_path)
        wait_for(lambda: engine.stats().remote_available, timeout_s=5.0)
        assert engine.generate([prompts[1]], greedy(8))[0][0] == expected[1]
        wait_for(lambda: engine.stats().remote_put_blocks >= len(SYSTEM_2) // BLOCK)
    finally:
        engine.close()


def test_deepseek_latent_blocks_are_stored_once_and_read_by_both_ranks(
    kv_service,  # noqa: F811 - the fixture imported above
    tmp_path,
):
    """DeepSeek's latent cache is whole on each rank: rank 0 alone stores a block, and both
    ranks read that one copy."""
    path = tmp_path / "deepseek"
    make_deepseek_checkpoint(path)
    prompt_a, prompt_b = [*SYSTEM_1, 17, 18, 19], [*SYSTEM_1, 40, 41, 42, 43]
    expected_b = one_rank_tokens(path, [prompt_b], 6)[0]
    port = free_port()
    kv_service.start("memory", port, tmp_path)
    writer = remote_engine(path, port, tensor_parallel_size=2)
    try:
        writer.generate([prompt_a], greedy(6))
        wait_for(lambda: writer.stats().remote_put_blocks >= len(SYSTEM_1) // BLOCK)
        ranks = [
            rank_kv_fingerprint(
                str(path), writer.model_config, BLOCK, writer.kv_cache, TensorParallel(r, 2)
            )
            for r in (0, 1)
        ]
    finally:
        writer.close()
    stored = writer.stats().remote_put_blocks  # every put finished (or dropped) by now
    fingerprint = writer.kv_fingerprint
    assert ranks == [(fingerprint, True), (fingerprint, False)]  # one slice, rank 0 stores
    client = KVClientSync(f"127.0.0.1:{port}", timeout_s=2.0)
    try:
        system = chained_block_hashes(SYSTEM_1, BLOCK)
        assert client.lookup(fingerprint, system) == len(system)
        stats = client.stats()
        assert stats is not None
        assert stats.tiers[0].blocks == stored  # under one key, not one per rank
    finally:
        client.close()

    reader = remote_engine(path, port, tensor_parallel_size=2)
    try:
        assert reader.generate([prompt_b], greedy(6))[0][0] == expected_b
        assert reader.stats().remote_hit_tokens == len(SYSTEM_1)
    finally:
        reader.close()
