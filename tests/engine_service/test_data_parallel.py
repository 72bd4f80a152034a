"""Data-parallel attention on the CPU (gloo, two processes): each data-parallel rank
schedules its own batch in its own KV pool, the MoE layers exchange tokens between the ranks
(expert parallel), and an idle rank runs dummy batches. The tokens and logprobs are one
process's, under prefix hits, chunked prefill and preemption.

The test process is rank 0 (and data-parallel rank 0); each engine starts rank 1 as a child.
"""

from __future__ import annotations

import json
import random

import pytest

from engine_service.engine import LLMEngine, SamplingParams
from tests.engine_service.conftest import make_checkpoint
from tests.engine_service.deepseek_checkpoints import make_deepseek_checkpoint
from tests.engine_service.helpers import assert_pool_entirely_free, make_engine
from tests.engine_service.test_tensor_parallel import assert_same

DP_EP = {"data_parallel_size": 2, "enable_expert_parallel": True}
# Per rank: a pool too small for its requests at once (preemption), a step budget shorter
# than the longest prompt (chunked prefill).
KNOBS = dict(num_kv_blocks=24, block_size=4, max_num_batched_tokens=32)


def workload(vocab: int) -> tuple[list[tuple[list[int], SamplingParams]], list]:
    """(requests added at once, requests added later). Added at once, the requests
    alternate between the two ranks: rank 0 gets the long ones (prompts sharing a prefix:
    prefix-cache hits; the longest chunked; more than its pool holds: preemption), rank 1
    short ones that finish early, after which it idles (dummy batches) until the late
    request arrives. Parallel samples and a seeded sampled request ride along."""
    rng = random.Random(3)
    prefix = [rng.randrange(3, vocab) for _ in range(21)]

    def fresh(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    greedy = SamplingParams(temperature=0.0, max_tokens=20, logprobs=3, ignore_eos=True)
    short = SamplingParams(temperature=0.0, max_tokens=3, logprobs=2, ignore_eos=True)
    first = [
        (prefix + fresh(40), greedy),  # rank 0
        (fresh(5), short),  # rank 1
        (prefix + fresh(9), greedy),  # rank 0: hits the prefix
        (fresh(6), SamplingParams(temperature=0.9, seed=11, max_tokens=3, logprobs=1)),  # 1
        (prefix + fresh(3), SamplingParams(temperature=0.0, max_tokens=12, n=2, logprobs=1)),
    ]
    late = [(prefix + fresh(7), greedy)]
    return first, late


def serve(engine: LLMEngine, first, late, late_after: int = 12) -> dict:
    """Tokens and logprobs per (request, sample); ``late`` joins after ``late_after`` steps."""
    pairs = first + late
    for i, (prompt, params) in enumerate(first):
        engine.add_request(f"r{i}", prompt, params)
    outputs: dict[tuple[int, int], list] = {}
    steps = 0
    while engine.has_unfinished() or steps <= late_after:
        if steps == late_after:
            for j, (prompt, params) in enumerate(late, start=len(first)):
                engine.add_request(f"r{j}", prompt, params)
        for output in engine.step():
            outputs.setdefault((int(output.request_id[1:]), output.index), []).append(output)
        steps += 1
    assert {key[0] for key in outputs} == set(range(len(pairs)))
    return {
        key: (
            [t for o in outs for t in o.new_token_ids],
            [lp for o in outs for lp in (o.new_logprobs or [])],
        )
        for key, outs in outputs.items()
    }


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    path = tmp_path_factory.mktemp("dp-mixtral")
    make_checkpoint(path, "mixtral")
    return path


# Mixtral; Qwen2-MoE with its shared expert and a dense layer among the MoE ones; gpt-oss
# with expert biases, attention sinks and sliding layers; DeepSeek-V3 with latent attention
# (its latent cache per rank), grouped routing and shared experts.
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_two_data_parallel_ranks_with_expert_parallel_moe_give_the_tokens_of_one(
    family, mixtral, tmp_path
):
    if family == "mixtral":
        path = mixtral
    elif family == "deepseek_v3":
        path = tmp_path
        make_deepseek_checkpoint(path)
    else:
        path = tmp_path
        make_checkpoint(path, family)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    first, late = workload(vocab)
    expected = serve(make_engine(path, **KNOBS), first, late)
    engine = make_engine(path, **KNOBS, **DP_EP)
    try:
        # Rank 0 holds the experts' first half, rank 1 (its own process) the rest.
        experts = next(m for m in engine.model.modules() if hasattr(m, "ep"))
        assert experts.ep is not None and experts.ep.size == 2 and experts.ep.share_size == 1
        assert experts.w13.shape[0] == experts.num_experts // 2
        got = serve(engine, first, late)
        ranks = engine._shards
        assert [s.scheduler.prefix_cache_queries > 0 for s in ranks] == [True, True]
        assert engine.dummy_steps > 0  # rank 1 idled while rank 0 ran
        stats = engine.stats()
        assert stats.num_preemptions > 0
        assert stats.prefix_cache_hits > 0
        assert stats.num_blocks_total == 2 * KNOBS["num_kv_blocks"]
        assert engine.max_num_seqs == 2 * engine.config.max_num_seqs
        for shard in ranks:
            assert_pool_entirely_free(shard.kv_manager)
    finally:
        engine.close()
    assert_same(expected, got)


def test_requests_go_to_the_least_loaded_rank_and_abort_frees_their_rank(mixtral):
    engine = make_engine(mixtral, **KNOBS, **DP_EP)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=4)
        for i in range(3):
            engine.add_request(f"q{i}", [5 + i, 6, 7], params)
        assert [s.load for s in engine._shards] == [2, 1]
        assert engine.abort("q0") and engine.abort("q2")
        engine.add_request("q3", [9, 9], params)  # rank 0 is the idle one now
        assert [s.load for s in engine._shards] == [1, 1]
        with pytest.raises(ValueError, match="KV hand-off"):
            engine.add_request("q4", [9, 8], params, import_kv=True)
        while engine.has_unfinished():
            engine.step()
        assert engine.stats().num_running == 0
        for shard in engine._shards:
            assert_pool_entirely_free(shard.kv_manager)
    finally:
        engine.close()


def test_a_dense_model_runs_plainly_replicated_on_data_parallel_ranks(tmp_path):
    """No MoE layer exchanges tokens: each rank runs only when it has work (no dummies)."""
    make_checkpoint(tmp_path, "llama")
    vocab = json.loads((tmp_path / "config.json").read_text())["vocab_size"]
    first, late = workload(vocab)
    expected = serve(make_engine(tmp_path, **KNOBS), first, late)
    engine = make_engine(tmp_path, **KNOBS, data_parallel_size=2)
    try:
        got = serve(engine, first, late)
        assert engine.dummy_steps == 0
        assert engine.stats().num_preemptions > 0
    finally:
        engine.close()
    assert_same(expected, got)


def test_a_moe_model_without_expert_parallelism_holds_every_expert_on_each_rank(mixtral):
    """Without --enable-expert-parallel each data-parallel rank holds all the experts and
    runs them on its own tokens: no exchange, no dummy batches, one process's tokens."""
    first, late = workload(json.loads((mixtral / "config.json").read_text())["vocab_size"])
    expected = serve(make_engine(mixtral, **KNOBS), first, late)
    engine = make_engine(mixtral, **KNOBS, data_parallel_size=2)
    try:
        experts = next(m for m in engine.model.modules() if hasattr(m, "ep"))
        assert experts.ep is None and experts.w13.shape[0] == experts.num_experts
        got = serve(engine, first, late)
        assert engine.dummy_steps == 0
    finally:
        engine.close()
    assert_same(expected, got)


def test_tensor_parallel_groups_inside_data_parallel_ranks_give_the_tokens_of_one(mixtral):
    """DP=2 x TP=2, four processes: each data-parallel rank's attention split over its two
    ranks (rank 0 sends each group its steps, the group's first rank sends the logits back),
    the experts shared out over all four with tokens exchanged all-to-all. A small workload:
    four requests over the two data-parallel ranks."""
    first, _ = workload(json.loads((mixtral / "config.json").read_text())["vocab_size"])
    first = first[:4]
    expected = serve(make_engine(mixtral, **KNOBS), first, [], late_after=0)
    engine = make_engine(mixtral, **KNOBS, **DP_EP, tensor_parallel_size=2)
    try:
        attn = engine.model.model.layers[0].self_attn
        assert attn.num_heads == engine.model_config.num_heads // 2
        experts = next(m for m in engine.model.modules() if hasattr(m, "ep"))
        assert experts.ep is not None and (experts.ep.size, experts.ep.share_size) == (4, 2)
        assert experts.w13.shape[0] == experts.num_experts // 4
        got = serve(engine, first, [], late_after=0)
        assert [s.scheduler.prefix_cache_queries > 0 for s in engine._shards] == [True, True]
    finally:
        engine.close()
    assert_same(expected, got)
