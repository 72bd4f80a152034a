"""Our models and engine against ``transformers``: same greedy tokens, same logprobs.

Every family runs a batch of prompts of different lengths (some sharing a prefix, some
longer than Mistral's window) in four engine modes: prefix cache on, prefix cache off,
chunked prefill forced by a tiny token budget, and preemption forced by a tiny block pool.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine_service.engine import EngineConfig, LLMEngine, SamplingParams

MAX_NEW = 12
LOGPROB_TOL = 2e-3


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(3, vocab) for _ in range(24)]
    return [
        [rng.randrange(3, vocab) for _ in range(5)],
        shared,
        [*shared, *(rng.randrange(3, vocab) for _ in range(9))],
        [rng.randrange(3, vocab) for _ in range(41)],
        [rng.randrange(3, vocab) for _ in range(1)],
        [*shared[:16], *(rng.randrange(3, vocab) for _ in range(20))],
    ]


def _reference(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=MAX_NEW,
        min_new_tokens=MAX_NEW,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [
        torch.log_softmax(step[0].float(), -1)[tok].item() for step, tok in zip(out.logits, tokens)
    ]
    return tokens, logprobs


@pytest.fixture(scope="module")
def references(family_checkpoint):
    family, _, model = family_checkpoint
    prompts = _prompts(model.config.vocab_size)
    with torch.no_grad():
        return family, prompts, [_reference(model, p) for p in prompts]


MODES = {
    "prefix-cache-on": dict(enable_prefix_caching=True),
    "prefix-cache-off": dict(enable_prefix_caching=False),
    "tiny-chunks": dict(max_num_batched_tokens=7),
    "tiny-pool": dict(num_kv_blocks=14, block_size=4),
}


def run_waves(engine: LLMEngine, prompts, expected, label: str) -> None:
    """Runs ``prompts`` greedily twice on ``engine`` (the second wave hits what the first
    cached); tokens must equal ``expected``'s, logprobs within LOGPROB_TOL."""
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, logprobs=0)
    for wave in range(2):  # the second wave hits what the first cached
        ids = [f"{wave}-{i}" for i in range(len(prompts))]
        for rid, prompt in zip(ids, prompts):
            engine.add_request(rid, prompt, params)
        tokens = {rid: [] for rid in ids}
        logprobs = {rid: [] for rid in ids}
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id].extend(out.new_token_ids)
                logprobs[out.request_id].extend(lp.logprob for lp in out.new_logprobs or [])
        for i, rid in enumerate(ids):
            want_tokens, want_logprobs = expected[i]
            assert tokens[rid] == want_tokens, f"{label} prompt {i} wave {wave}"
            assert torch.allclose(
                torch.tensor(logprobs[rid]), torch.tensor(want_logprobs), atol=LOGPROB_TOL
            ), f"{label} prompt {i} wave {wave}"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_greedy_tokens_and_logprobs_match_transformers(family_checkpoint, references, mode):
    family, path, _ = family_checkpoint
    _, prompts, expected = references
    settings = {"num_kv_blocks": 256, "block_size": 8, **MODES[mode]}
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", **settings))
    run_waves(engine, prompts, expected, f"{family}/{mode}")

    stats = engine.stats()
    if mode == "prefix-cache-on":
        assert stats.prefix_cache_hits > 0
    if mode == "prefix-cache-off":
        assert stats.prefix_cache_hits == 0
    if mode == "tiny-pool":
        assert stats.num_preemptions > 0
    assert stats.num_blocks_free == stats.num_blocks_total


def test_mistral_prompts_exceed_the_window(family_checkpoint, references):
    family, _, model = family_checkpoint
    if family != "mistral":
        pytest.skip("window check is for the sliding-window family")
    _, prompts, _ = references
    assert max(len(p) for p in prompts) + MAX_NEW > 2 * model.config.sliding_window
