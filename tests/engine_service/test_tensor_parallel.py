"""Tensor parallelism on the CPU (gloo, two processes): the same tokens and logprobs as one
process, for every dense family, under prefix hits, chunked prefill, preemption and parallel
samples; and a rank that dies ends its replica. Speculative decoding on several ranks is
``test_speculative_parallel.py``'s.

The test process is rank 0; each TP engine starts its rank 1 as a child process.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_service.engine import LLMEngine, SamplingParams
from switchyard.exit_codes import CANNOT_START
from tests.engine_service.conftest import make_checkpoint
from tests.engine_service.deepseek_checkpoints import make_deepseek_checkpoint, write_mtp_checkpoint
from tests.engine_service.helpers import (
    assert_pool_entirely_free,
    make_engine,
    make_llama_checkpoint,
    run_all,
)
from tests.engine_service.test_deepseek_mtp import MTP
from tests.engine_service.test_multimodal import PROMPTS as MM_PROMPTS
from tests.engine_service.test_multimodal import _run as run_multimodal
from tests.engine_service.test_parity import _prompts
from tests.multimodal_support import expand_prompt, make_qwen2_vl_checkpoint

REPO = Path(__file__).resolve().parents[2]
TP = {"tensor_parallel_size": 2}

# Each family with the shape that stresses its sharding: one KV head replicated on both
# ranks (llama), an odd vocabulary padded on the second rank and tied to the embedding
# (qwen3), biased q/k/v split by heads (qwen2), a sliding window (mistral).
FAMILY_OVERRIDES = {
    "llama": dict(num_key_value_heads=1),
    "qwen3": dict(vocab_size=383),
    "qwen2": dict(),
    "mistral": dict(),
}


def workload(vocab: int) -> list[tuple[list[int], SamplingParams]]:
    """Shared prefixes (prefix-cache hits), prompts longer than a step's budget (chunked
    prefill), parallel samples (copy-on-write block copies), a seeded sampled request (rank
    0 samples alone), logprobs throughout."""
    rng = random.Random(7)
    prefix = [rng.randrange(3, vocab) for _ in range(21)]
    prompts = [prefix + [rng.randrange(3, vocab) for _ in range(n)] for n in (3, 9, 40)] + [
        [rng.randrange(3, vocab) for _ in range(n)] for n in (5, 17)
    ]
    greedy = SamplingParams(temperature=0.0, max_tokens=16, logprobs=3, ignore_eos=True)
    pairs = [(p, greedy) for p in prompts]
    pairs.append((prompts[0], SamplingParams(temperature=0.0, max_tokens=12, n=2, logprobs=1)))
    pairs.append((prompts[1], SamplingParams(temperature=0.9, seed=11, max_tokens=12, logprobs=2)))
    return pairs


def serve(engine: LLMEngine, pairs) -> dict[tuple[int, int], tuple[list[int], list]]:
    """Add every request at once, step to the end; tokens and logprobs per (request, sample)."""
    for i, (prompt, params) in enumerate(pairs):
        engine.add_request(f"r{i}", prompt, params)
    results = {}
    for (rid, index), outputs in run_all(engine).items():
        tokens = [t for o in outputs for t in o.new_token_ids]
        logprobs = [lp for o in outputs for lp in (o.new_logprobs or [])]
        results[(int(rid[1:]), index)] = (tokens, logprobs)
    return results


def assert_same(single: dict, parallel: dict, tol: float = 1e-4) -> None:
    assert single.keys() == parallel.keys()
    for key in single:
        tokens, logprobs = single[key]
        tp_tokens, tp_logprobs = parallel[key]
        assert tp_tokens == tokens, key
        assert len(tp_logprobs) == len(logprobs)
        for ours, theirs in zip(tp_logprobs, logprobs):
            assert ours.token_id == theirs.token_id
            assert abs(ours.logprob - theirs.logprob) <= tol, (key, ours, theirs)
            assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]
            for (_, a), (_, b) in zip(ours.top, theirs.top):
                assert abs(a - b) <= tol


@pytest.mark.parametrize("family", sorted(FAMILY_OVERRIDES))
def test_two_ranks_give_the_tokens_and_logprobs_of_one(family, tmp_path):
    make_checkpoint(tmp_path, family, **FAMILY_OVERRIDES[family])
    vocab = json.loads((tmp_path / "config.json").read_text())["vocab_size"]
    pairs = workload(vocab)
    # A pool too small for every request at once (preemption) and a step budget shorter
    # than the longest prompt (chunked prefill).
    knobs = dict(num_kv_blocks=40, block_size=4, max_num_batched_tokens=32)
    single = make_engine(tmp_path, **knobs)
    expected = serve(single, pairs)
    parallel = make_engine(tmp_path, **knobs, **TP)
    try:
        got = serve(parallel, pairs)
        assert parallel.scheduler.num_preemptions > 0
        assert parallel.scheduler.prefix_cache_hits > 0
        assert_pool_entirely_free(parallel.kv_manager)
    finally:
        parallel.close()
    assert_same(expected, got)


def test_each_rank_holds_half_the_heads_and_vocabulary(tmp_path):
    """The rank-0 engine's shards are halves: q/k/v heads, MLP inner size, vocabulary rows,
    and its KV cache holds its own key/value heads only."""
    make_checkpoint(tmp_path, "qwen2")
    engine = make_engine(tmp_path, **TP)
    try:
        attn = engine.model.model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
        assert engine.model.model.layers[0].mlp.down_proj.weight.shape == (64, 64)
        assert engine.model.model.embed_tokens.weight.shape == (192, 64)
        assert engine.kv_cache.shape[4] == 1
    finally:
        engine.close()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp-llama")
    make_llama_checkpoint(path)
    return path


# -- a dying rank ---------------------------------------------------------------------------


def start_service(checkpoint: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine_service",
            "--model",
            str(checkpoint),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--controller-address",
            "",
            "--num-kv-blocks",
            "32",
            "--tensor-parallel-size",
            "2",
            *extra,
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_until(
    process: subprocess.Popen, pattern: str, timeout: float = 120
) -> tuple[re.Match, str]:
    """Log lines of ``process`` up to the first matching ``pattern``."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match, "".join(seen)
    raise AssertionError(f"no {pattern!r} in:\n{''.join(seen)}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[1][0] != "Z"


def test_a_head_count_the_ranks_cannot_split_cannot_start(tmp_path):
    """Every rank refuses the checkpoint; the replica exits with CANNOT_START (no restart
    loop) and says why."""
    make_checkpoint(tmp_path, "llama", num_attention_heads=3, num_key_value_heads=3, hidden_size=96)
    process = start_service(tmp_path)
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == CANNOT_START, stderr
    assert "attention heads (3) is not divisible by tensor-parallel size 2" in stderr


def test_a_split_engine_cannot_take_a_disaggregation_role(llama):
    """A KV hand-off moves one process's blocks; a tensor-parallel engine's KV is spread over
    its ranks, so --role prefill/decode with several ranks is refused before loading."""
    process = start_service(llama, "--role", "decode")
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == CANNOT_START, stderr
    assert "--role decode is not supported with --tensor-parallel-size" in stderr


def test_a_killed_rank_takes_the_replica_down_with_a_clear_log_line(llama):
    process = start_service(llama)
    try:
        match, _ = read_until(process, r'"msg": "engine rank 1 started".*"pid": (\d+)')
        worker = int(match.group(1))
        read_until(process, r'"msg": "engine serving"')
        os.kill(worker, signal.SIGKILL)
        read_until(process, r"engine rank 1 exited", timeout=30)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1  # a crash worth a restart, not CANNOT_START


def test_rank_1_follows_a_killed_rank_0(llama):
    process = start_service(llama)
    try:
        match, _ = read_until(process, r'"msg": "engine rank 1 started".*"pid": (\d+)')
        worker = int(match.group(1))
        read_until(process, r'"msg": "engine serving"')
        process.kill()
        process.wait(timeout=30)
        deadline = time.monotonic() + 20
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(worker)
    finally:
        if process.poll() is None:
            process.kill()


def test_deepseek_v3_under_tensor_and_expert_parallelism_gives_the_tokens_of_one_rank(tmp_path):
    """Latent attention split by heads (the latent and rope-key projections, and so the
    latent cache, whole on every rank), dense and shared-expert MLPs split, routed experts
    split (TP=2) or shared out (TP=2 with --enable-expert-parallel): one process's tokens
    and logprobs under prefix hits, chunked prefill and preemption."""
    model = make_deepseek_checkpoint(tmp_path)
    c = model.config
    pairs = workload(c.vocab_size)
    knobs = dict(num_kv_blocks=40, block_size=4, max_num_batched_tokens=32)
    expected = serve(make_engine(tmp_path, **knobs), pairs)
    for parallel in (TP, {**TP, "enable_expert_parallel": True}):
        engine = make_engine(tmp_path, **knobs, **parallel)
        try:
            attn = engine.model.model.layers[0].self_attn
            assert attn.num_heads == c.num_attention_heads // 2
            assert attn.kv_b_proj.weight.shape[0] == 2 * (c.qk_nope_head_dim + c.v_head_dim)
            assert attn.kv_a_proj_with_mqa.weight.shape[0] == c.kv_lora_rank + c.qk_rope_head_dim
            width = c.kv_lora_rank + c.qk_rope_head_dim
            assert tuple(engine.kv_cache.shape[1:]) == (c.num_hidden_layers, 1, 4, 1, width)
            assert engine.model.lm_head.weight.shape[0] == c.vocab_size // 2
            got = serve(engine, pairs)
            assert engine.scheduler.num_preemptions > 0
            assert engine.scheduler.prefix_cache_hits > 0
        finally:
            engine.close()
        assert_same(expected, got)


def test_deepseek_mtp_layers_split_like_the_target_draft_as_on_one_rank(tmp_path):
    """The ``mtp`` proposer's layer runs on both ranks, split like the target: the same
    drafts are proposed and accepted as on one process, and the tokens are speculation
    off's."""
    write_mtp_checkpoint(tmp_path)
    prompts = _prompts(320)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    knobs = dict(num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)
    expected = make_engine(tmp_path, **knobs).generate(prompts, params)
    single = make_engine(tmp_path, **knobs, speculative_config=MTP % 2)
    assert single.generate(prompts, params) == expected
    engine = make_engine(tmp_path, **knobs, **TP, speculative_config=MTP % 2)
    try:
        assert engine.generate(prompts, params) == expected
        stats, want = engine.stats(), single.stats()
        assert stats.spec_num_accepted_tokens > 0
        assert stats.spec_accepted_per_position == want.spec_accepted_per_position
        assert stats.spec_num_draft_tokens == want.spec_num_draft_tokens
    finally:
        engine.close()


def test_a_vision_language_model_split_over_ranks_gives_the_tokens_of_one(tmp_path):
    """Qwen2-VL (M-RoPE) with one and two images per prompt and a text-only prompt, in
    steps of 8 tokens that end inside images. At TP=2 the language model is split and rank
    0 alone holds the vision tower: it encodes the images and sends their embeddings and
    the rotary positions with each step. At DP=2 rank 1 runs its own requests' steps with
    the embeddings rank 0 sends it. Tokens and logprobs are one process's."""
    path = make_qwen2_vl_checkpoint(tmp_path / "ckpt")
    prompts = [expand_prompt(path, messages, images)[:2] for messages, images in MM_PROMPTS]
    knobs = dict(num_kv_blocks=96, block_size=4, max_num_batched_tokens=8)
    expected = run_multimodal(make_engine(path, **knobs), prompts)
    for parallel in (TP, {"data_parallel_size": 2}):
        engine = make_engine(path, **knobs, **parallel)
        try:
            if parallel is TP:
                language = engine.model.model.language_model
                assert language.layers[0].self_attn.num_heads == 2
                assert engine.model.lm_head.weight.shape[0] == -(
                    -engine.model.config.vocab_size // 2
                )
            got = run_multimodal(engine, prompts)
            assert engine.encoder.encoder_runs > 0
        finally:
            engine.close()
        for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, expected):
            assert tokens == want_tokens, parallel
            assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs)) < 1e-4


# -- mixture-of-experts models: tensor and expert parallel ----------------------------------

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_models_under_tensor_and_expert_parallelism_give_the_tokens_of_one_rank(
    family, tmp_path
):
    """Experts split by their inner dimension (TP=2) and shared out whole over the ranks with
    tokens exchanged all-to-all (TP=2 with --enable-expert-parallel) both give one process's
    tokens and logprobs, under prefix hits, chunked prefill and preemption."""
    make_checkpoint(tmp_path, family)
    vocab = json.loads((tmp_path / "config.json").read_text())["vocab_size"]
    pairs = workload(vocab)
    knobs = dict(num_kv_blocks=40, block_size=4, max_num_batched_tokens=32)
    expected = serve(make_engine(tmp_path, **knobs), pairs)
    for parallel in (TP, {**TP, "enable_expert_parallel": True}):
        engine = make_engine(tmp_path, **knobs, **parallel)
        try:
            got = serve(engine, pairs)
            assert engine.scheduler.num_preemptions > 0
            if parallel.get("enable_expert_parallel"):
                experts = next(m for m in engine.model.modules() if hasattr(m, "ep"))
                assert experts.ep is not None and experts.w13.shape[0] < experts.num_experts
        finally:
            engine.close()
        assert_same(expected, got)
