"""DeepSeek-V3 against ``transformers``: MLA over the paged latent cache, dense and MoE
layers, grouped sigmoid routing with the correction bias, YaRN rope; and the latent blocks
through the host tier and the KV service."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers

from engine_service.engine import EngineConfig, LLMEngine
from engine_service.engine.memory import kv_block_bytes
from engine_service.models.deepseek_v3 import grouped_topk
from tests.engine_service.deepseek_checkpoints import TINY, make_deepseek_checkpoint
from tests.engine_service.helpers import greedy, make_engine
from tests.engine_service.test_cross_replica import (  # noqa: F401 - kv_service is a fixture
    free_port,
    kv_service,
    remote_engine,
    wait_for,
)
from tests.engine_service.test_parity import MODES, _prompts, _reference, run_waves


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> tuple[Path, transformers.DeepseekV3ForCausalLM]:
    path = tmp_path_factory.mktemp("ckpt-deepseek")
    return path, make_deepseek_checkpoint(path)


@pytest.fixture(scope="module")
def references(deepseek):
    _, model = deepseek
    prompts = _prompts(model.config.vocab_size)
    with torch.no_grad():
        return prompts, [_reference(model, p) for p in prompts]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_greedy_tokens_and_logprobs_match_transformers(deepseek, references, mode):
    path, _ = deepseek
    prompts, expected = references
    settings = {"num_kv_blocks": 256, "block_size": 8, **MODES[mode]}
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", **settings))
    run_waves(engine, prompts, expected, f"deepseek/{mode}")
    stats = engine.stats()
    if mode == "prefix-cache-on":
        assert stats.prefix_cache_hits > 0
    if mode == "tiny-pool":
        assert stats.num_preemptions > 0
    assert stats.num_blocks_free == stats.num_blocks_total


def test_without_query_compression_or_interleaved_rope(tmp_path):
    """``q_lora_rank: null`` (one query projection, as DeepSeek-V2-Lite) and plain rope."""
    model = make_deepseek_checkpoint(
        tmp_path,
        q_lora_rank=None,
        rope_interleave=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    )
    prompts = _prompts(model.config.vocab_size)[:4]
    with torch.no_grad():
        expected = [_reference(model, p) for p in prompts]
    engine = LLMEngine(
        EngineConfig(model=str(tmp_path), dtype="float32", num_kv_blocks=64, block_size=8)
    )
    run_waves(engine, prompts, expected, "deepseek/no-q-lora")


def test_the_cache_holds_one_latent_per_token_and_layer(deepseek):
    path, model = deepseek
    engine = make_engine(path, num_kv_blocks=16, block_size=4)
    c = model.config
    width = c.kv_lora_rank + c.qk_rope_head_dim
    assert tuple(engine.kv_cache.shape) == (17, c.num_hidden_layers, 1, 4, 1, width)
    per_block = kv_block_bytes(engine.model_config, 4, torch.float32)
    assert per_block == c.num_hidden_layers * 4 * width * 4
    # Keys and values of every head (what a dense layout would cache) take far more.
    full = c.num_hidden_layers * 4 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * 4
    assert 3 * per_block < full


def test_grouped_routing_equals_transformers_router():
    config = transformers.DeepseekV3Config(**TINY)
    torch.manual_seed(0)
    router = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.normal_(0, 1.0)
        router.e_score_correction_bias.uniform_(-0.5, 0.5)
    hidden = torch.randn(200, config.hidden_size)
    logits, want_weights, want_ids = router(hidden)
    weights, ids = grouped_topk(
        logits,
        router.e_score_correction_bias,
        config.num_experts_per_tok,
        config.n_group,
        config.topk_group,
        config.norm_topk_prob,
        config.routed_scaling_factor,
    )
    order, want_order = ids.argsort(-1), want_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), want_ids.gather(1, want_order))
    torch.testing.assert_close(weights.gather(1, order), want_weights.gather(1, want_order))
    # The groups matter: some tokens' best experts overall lie outside their chosen groups.
    unrestricted = (logits.sigmoid() + router.e_score_correction_bias).topk(3).indices
    assert not torch.equal(unrestricted.sort(-1).values, ids.sort(-1).values)


def _workload() -> list[list[int]]:
    rng = random.Random(7)
    system = [rng.randrange(3, 300) for _ in range(40)]
    other = [[rng.randrange(3, 300) for _ in range(45)] for _ in range(2)]
    return [[*system, 5, 6, 7], other[0], [*system, 8, 9], other[1], [*system, 10]]


def test_latent_blocks_come_back_from_the_host_tier(deepseek):
    path, _ = deepseek
    prompts = _workload()
    roomy = make_engine(path, num_kv_blocks=64)
    expected = [roomy.generate([p], greedy(6))[0][0] for p in prompts]
    engine = make_engine(
        path,
        num_kv_blocks=16,
        enable_kv_offload=True,
        kv_offload_host_bytes=1 << 20,
        enable_kv_events=True,
    )
    assert [engine.generate([p], greedy(6))[0][0] for p in prompts] == expected
    stats = engine.stats()
    assert stats.restored_blocks_host > 0
    # The host tier holds whole latent blocks: 1 MiB of them is many more than of full K/V.
    block = kv_block_bytes(engine.model_config, 4, torch.float32)
    assert stats.host_capacity_blocks == (1 << 20) // block
    assert engine.kv_events is not None and engine.kv_events.drain()

    # Scrambled host copies change the output: the restored latents are really read.
    engine.offload.local.host.normal_(std=10.0)  # type: ignore[union-attr]
    engine.generate([prompts[1]], greedy(6))
    assert engine.generate([prompts[0]], greedy(6))[0][0] != expected[0]


def test_replica_b_reuses_latent_blocks_through_the_kv_service(
    deepseek,
    kv_service,  # noqa: F811 - the fixture imported above
    tmp_path,
):
    path, _ = deepseek
    system = _workload()[0][:40]
    prompt_a, prompt_b = [*system, 17, 18, 19], [*system, 40, 41, 42, 43]
    reference = make_engine(path)
    expected_b = reference.generate([prompt_b], greedy(6))[0][0]
    port = free_port()
    kv_service.start("memory", port, tmp_path)
    replica_a, replica_b = remote_engine(path, port), remote_engine(path, port)
    try:
        replica_a.generate([prompt_a], greedy(6))
        wait_for(lambda: replica_a.stats().remote_put_blocks >= len(system) // 4)
        assert replica_b.generate([prompt_b], greedy(6))[0][0] == expected_b
        stats = replica_b.stats()
        assert stats.remote_hit_tokens == len(system)
        assert stats.restored_blocks_remote == len(system) // 4
    finally:
        replica_a.close()
        replica_b.close()
