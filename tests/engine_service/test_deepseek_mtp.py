"""The ``mtp`` speculative method: DeepSeek-V3's own multi-token-prediction layer drafts.

``transformers`` does not run MTP layers, so the checkpoint's MTP weights are written here,
next to a one-layer target saved by ``transformers``. The MTP block is a copy of the
target's layer fed mostly the next token's embedding (the target's embeddings have unit
RMS, so ``enorm`` leaves them as they are) and its head is the target's norm and head: it
then predicts roughly what the target will say one token later, so drafts are often but not
always accepted, and both verification paths run. Outputs must equal speculation off.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_service.engine import EngineConfig, LLMEngine, SamplingParams
from tests.engine_service.deepseek_checkpoints import make_deepseek_checkpoint, write_mtp_checkpoint
from tests.engine_service.helpers import make_llama_checkpoint
from tests.engine_service.test_parity import _prompts

MTP = '{"method": "mtp", "num_speculative_tokens": %d}'


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt-deepseek-mtp")
    write_mtp_checkpoint(path)
    return path


def _engine(path: Path, **settings) -> LLMEngine:
    config = {"num_kv_blocks": 128, "block_size": 4, **settings}
    return LLMEngine(EngineConfig(model=str(path), dtype="float32", **config))


CASES = {
    "prefix-cache": dict(),
    "chunked-prefill": dict(max_num_batched_tokens=9),
    "preemption": dict(num_kv_blocks=20),
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_outputs_with_mtp_equal_speculation_off(mtp_checkpoint, case, k):
    prompts = _prompts(320)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    plain = _engine(mtp_checkpoint)
    expected = plain.generate(prompts, params)
    engine = _engine(mtp_checkpoint, speculative_config=MTP % k, **CASES[case])
    # Two waves: the second meets the first's blocks in the prefix cache.
    assert engine.generate(prompts, params) == expected
    assert engine.generate(prompts, params) == expected
    stats = engine.stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    if case == "prefix-cache":
        assert stats.prefix_cache_hits > 0
    if case == "preemption":
        assert stats.num_preemptions > 0
    assert stats.num_blocks_free == stats.num_blocks_total


def test_mtp_drafts_are_accepted_often_on_a_predictable_checkpoint(mtp_checkpoint):
    """The drafts really come from the MTP layer fed the right hidden states and tokens:
    the copy of the target's layer agrees with it far above chance (1 in 320)."""
    engine = _engine(mtp_checkpoint, speculative_config=MTP % 2)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    engine.generate(_prompts(320), params)
    stats = engine.stats()
    assert stats.spec_num_accepted_tokens / stats.spec_num_draft_tokens > 0.3


def test_sampled_requests_with_mtp_are_reproducible(mtp_checkpoint):
    prompts = _prompts(320)[:3]
    params = SamplingParams(temperature=0.8, max_tokens=12, seed=11, ignore_eos=True)
    first = _engine(mtp_checkpoint, speculative_config=MTP % 2).generate(prompts, params)
    second = _engine(mtp_checkpoint, speculative_config=MTP % 2).generate(prompts, params)
    assert first == second


def test_mtp_on_a_checkpoint_without_mtp_layers_fails_at_start(tmp_path):
    make_deepseek_checkpoint(tmp_path)  # num_nextn_predict_layers: 0
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        _engine(tmp_path, speculative_config=MTP % 1)


def test_mtp_on_a_dense_model_fails_at_start(tmp_path):
    make_llama_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="LlamaForCausalLM has none"):
        _engine(tmp_path, speculative_config=MTP % 1)


def test_mtp_layers_declared_but_missing_from_the_weights_fail_at_start(tmp_path):
    make_deepseek_checkpoint(tmp_path, num_mtp_layers=1)  # transformers saves no MTP weights
    with pytest.raises(ValueError, match="weights are incomplete"):
        _engine(tmp_path, speculative_config=MTP % 1)


def test_a_tree_is_refused_for_mtp():
    from engine_service.engine.spec.config import SpeculativeConfig

    with pytest.raises(ValueError, match="mtp draft chains"):
        SpeculativeConfig.parse(
            '{"method": "mtp", "num_speculative_tokens": 2, "tree": {"topk": 2, "num_draft_tokens": 4}}'
        )


def test_the_kv_budget_covers_the_mtp_layers_cache(mtp_checkpoint):
    budget = 1 << 20
    plain = _engine(mtp_checkpoint, num_kv_blocks=None, kv_cache_memory_bytes=budget)
    engine = _engine(
        mtp_checkpoint,
        num_kv_blocks=None,
        kv_cache_memory_bytes=budget,
        speculative_config=MTP % 1,
    )
    mtp_cache = engine.proposer.runner.kv_cache  # type: ignore[union-attr]
    used = engine.kv_cache[:-1].nbytes + mtp_cache[:-1].nbytes
    assert used <= budget < used + engine.kv_cache[0].nbytes + mtp_cache[0].nbytes
    assert engine.kv_manager.num_blocks < plain.kv_manager.num_blocks
