"""The sampler, through the engine on a tiny random Llama: seeds, n > 1, greedy equivalents,
stopping, logprobs and penalties, checked against ``transformers`` where it computes the same."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from engine_service.engine import LLMEngine, SamplingParams
from tests.engine_service.helpers import (
    EOS,
    VOCAB,
    greedy,
    make_engine,
    make_llama_checkpoint,
    run_all,
    tokens_of,
)

LOGPROB_TOL = 2e-3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-sampling")
    model = make_llama_checkpoint(path)
    return path, model


@pytest.fixture(scope="module")
def engine(checkpoint) -> LLMEngine:
    """One engine for the tests that only read their own request's outputs."""
    return make_engine(checkpoint[0])


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(length)]


def generate_one(engine: LLMEngine, prompt: list[int], params: SamplingParams):
    """Every output of one request (sample 0), run alone to completion."""
    engine.add_request("one", prompt, params)
    return run_all(engine)[("one", 0)]


def hf_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position of ``tokens``."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.fixture(scope="module")
def stop_case(engine):
    """A prompt, its greedy continuation ``g`` (EOS ignored), and a stop token ``g[2]`` that
    greedy decoding emits third and not before (nor EOS before it)."""
    rng = random.Random(11)
    for _ in range(20):
        prompt = random_prompt(rng, 8)
        g = tokens_of(generate_one(engine, prompt, greedy(12, ignore_eos=True)))
        if g[2] not in g[:2] and EOS not in g[:3]:
            return prompt, g, g[2]
    raise AssertionError("no prompt with a usable stop token")


# -- seeds ------------------------------------------------------------------------------------

SEEDED = dict(temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, ignore_eos=True)


def test_seeded_request_gives_the_same_tokens_alone_and_in_a_busy_batch(checkpoint):
    rng = random.Random(0)
    prompt = random_prompt(rng, 9)
    params = SamplingParams(seed=42, **SEEDED)
    alone = make_engine(checkpoint[0]).generate([prompt], params)[0][0]

    busy = make_engine(checkpoint[0], max_num_batched_tokens=16)
    others = [
        SamplingParams(max_tokens=10, ignore_eos=True),
        greedy(6),
        SamplingParams(n=2, seed=7, max_tokens=8, temperature=1.3),
        SamplingParams(max_tokens=14, top_p=0.5, ignore_eos=True),
    ]
    for i, other in enumerate(others[:2]):
        busy.add_request(f"before-{i}", random_prompt(rng, 5 + 7 * i), other)
    busy.step()
    busy.step()
    busy.add_request("seeded", prompt, params)
    for i, other in enumerate(others[2:]):
        busy.add_request(f"after-{i}", random_prompt(rng, 20 - 6 * i), other)
    in_batch = tokens_of(run_all(busy)[("seeded", 0)])

    assert in_batch == alone


def test_different_seeds_give_different_tokens(engine):
    prompt = random_prompt(random.Random(1), 9)

    one = tokens_of(generate_one(engine, prompt, SamplingParams(seed=1, **SEEDED)))
    two = tokens_of(generate_one(engine, prompt, SamplingParams(seed=2, **SEEDED)))
    again = tokens_of(generate_one(engine, prompt, SamplingParams(seed=1, **SEEDED)))

    assert one != two
    assert one == again


# -- n > 1 ------------------------------------------------------------------------------------


def test_n_samples_share_the_prompts_full_blocks_and_report_every_index(checkpoint):
    # Synchronous steps, so that block tables can be read between them.
    engine = make_engine(checkpoint[0], block_size=4, async_scheduling=False)
    prompt = random_prompt(random.Random(2), 10)  # two full blocks and a partial one
    engine.add_request("r", prompt, SamplingParams(n=3, seed=5, max_tokens=6, ignore_eos=True))
    samples = list(engine._samples["r"])
    ref_counts = engine.kv_manager.pool.ref_counts

    outputs: dict[int, list[int]] = {0: [], 1: [], 2: []}
    finish_reasons = {}
    decode_steps = 0
    while engine.has_unfinished():
        for output in engine.step():
            outputs[output.index].extend(output.new_token_ids)
            if output.finished:
                finish_reasons[output.index] = output.finish_reason
        if any(s.is_finished for s in samples):
            continue
        decode_steps += 1
        prompt_blocks = samples[0].block_table[:2]
        assert all(s.block_table[:2] == prompt_blocks for s in samples)
        assert [ref_counts[b] for b in prompt_blocks] == [3, 3]
        if samples[0].num_tokens > len(prompt) + 1:  # each has written its own last block
            assert len({s.block_table[2] for s in samples}) == 3

    assert decode_steps >= 3
    assert finish_reasons == {0: "length", 1: "length", 2: "length"}
    assert all(len(tokens) == 6 for tokens in outputs.values())
    assert len({tuple(tokens) for tokens in outputs.values()}) == 3


# -- greedy equivalents -----------------------------------------------------------------------


def test_temperature_zero_is_greedy_decoding_of_the_model(checkpoint, engine):
    _, model = checkpoint
    prompt = random_prompt(random.Random(3), 7)

    tokens = tokens_of(generate_one(engine, prompt, greedy(10, ignore_eos=True, seed=9)))

    with torch.no_grad():
        reference = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=10,
            min_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    assert tokens == reference


def test_top_k_one_equals_greedy(engine):
    prompt = random_prompt(random.Random(4), 7)

    plain = tokens_of(generate_one(engine, prompt, greedy(10, ignore_eos=True)))
    top_1 = tokens_of(
        generate_one(engine, prompt, SamplingParams(top_k=1, max_tokens=10, ignore_eos=True))
    )

    assert top_1 == plain


# -- stopping ---------------------------------------------------------------------------------


def test_stop_token_stops_with_stop_and_names_the_token(engine, stop_case):
    prompt, g, stop = stop_case

    outputs = generate_one(engine, prompt, greedy(12, stop_token_ids=[stop]))

    assert tokens_of(outputs) == g[:3]
    assert outputs[-1].finish_reason == "stop"
    assert outputs[-1].stop_token_id == stop


def test_min_tokens_holds_back_stop_tokens_until_reached(engine, stop_case):
    prompt, g, stop = stop_case

    tokens = tokens_of(
        generate_one(engine, prompt, greedy(12, stop_token_ids=[stop], min_tokens=6))
    )

    assert len(tokens) >= 6
    assert tokens[:2] == g[:2]
    assert stop not in tokens[:6]


def test_max_tokens_stops_with_length(engine, stop_case):
    prompt, g, _ = stop_case

    outputs = generate_one(engine, prompt, greedy(5, ignore_eos=True))

    assert tokens_of(outputs) == g[:5]
    assert outputs[-1].finish_reason == "length"
    assert outputs[-1].stop_token_id is None


@pytest.fixture(scope="module")
def eos_engine(checkpoint, stop_case, tmp_path_factory) -> LLMEngine:
    """The same weights, with the stop case's stop token declared as the model's EOS."""
    path = tmp_path_factory.mktemp("llama-early-eos")
    for file in checkpoint[0].iterdir():
        shutil.copy(file, path / file.name)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((path / name).read_text())
        config["eos_token_id"] = stop_case[2]
        (path / name).write_text(json.dumps(config))
    return make_engine(path)


def test_eos_stops_with_stop(eos_engine, stop_case):
    prompt, g, eos = stop_case

    outputs = generate_one(eos_engine, prompt, greedy(12))

    assert tokens_of(outputs) == g[:3]
    assert outputs[-1].finish_reason == "stop"
    assert outputs[-1].stop_token_id == eos


def test_min_tokens_holds_back_eos_until_reached(eos_engine, stop_case):
    prompt, _, eos = stop_case

    tokens = tokens_of(generate_one(eos_engine, prompt, greedy(12, min_tokens=6)))

    assert len(tokens) >= 6
    assert eos not in tokens[:6]


def test_ignore_eos_keeps_generating_past_eos(eos_engine, stop_case):
    prompt, g, _ = stop_case

    outputs = generate_one(eos_engine, prompt, greedy(8, ignore_eos=True))

    assert tokens_of(outputs) == g[:8]
    assert outputs[-1].finish_reason == "length"


# -- logprobs ---------------------------------------------------------------------------------


def test_logprobs_are_the_models_log_softmax_with_sorted_top_alternatives(checkpoint, engine):
    _, model = checkpoint
    prompt = random_prompt(random.Random(5), 9)
    # Sampled, with a temperature: the reported logprobs are still the model's own.
    params = SamplingParams(
        temperature=0.8, top_k=50, seed=3, max_tokens=8, ignore_eos=True, logprobs=4
    )

    outputs = generate_one(engine, prompt, params)

    tokens = tokens_of(outputs)
    logprobs = [lp for o in outputs for lp in o.new_logprobs]
    expected = hf_logprobs(model, [*prompt, *tokens[:-1]])[len(prompt) - 1 :]
    assert [lp.token_id for lp in logprobs] == tokens
    for step, (lp, token) in enumerate(zip(logprobs, tokens)):
        assert lp.logprob == pytest.approx(expected[step, token].item(), abs=LOGPROB_TOL)
        top_ids = [t for t, _ in lp.top]
        top_values = [v for _, v in lp.top]
        assert len(lp.top) == 4
        assert top_values == sorted(top_values, reverse=True)
        assert top_ids == expected[step].topk(4).indices.tolist()
        assert top_values == pytest.approx(expected[step].topk(4).values.tolist(), abs=LOGPROB_TOL)


def test_logprobs_zero_gives_the_sampled_tokens_logprob_only(engine):
    prompt = random_prompt(random.Random(6), 5)

    outputs = generate_one(engine, prompt, greedy(3, ignore_eos=True, logprobs=0))

    logprobs = [lp for o in outputs for lp in o.new_logprobs]
    assert len(logprobs) == 3
    assert all(lp.top == [] and lp.logprob <= 0.0 for lp in logprobs)


def test_no_logprobs_unless_asked(engine):
    outputs = generate_one(engine, [5, 6, 7], greedy(3))

    assert all(o.new_logprobs is None for o in outputs)


# -- penalties --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repeating_case(engine):
    """A prompt whose greedy continuation repeats a token."""
    rng = random.Random(12)
    for _ in range(20):
        prompt = random_prompt(rng, 8)
        g = tokens_of(generate_one(engine, prompt, greedy(12, ignore_eos=True)))
        if len(set(g)) < len(g):
            return prompt, g
    raise AssertionError("no prompt whose greedy output repeats")


def penalised(logits: torch.Tensor, prompt: list[int], outputs: list[int], params) -> torch.Tensor:
    """The penalties as specified (after vLLM and OpenAI): repetition divides positive and
    multiplies negative logits of every token seen in the prompt or the output; frequency
    subtracts per output occurrence; presence subtracts once per token in the output."""
    counts = torch.bincount(torch.tensor(outputs, dtype=torch.long), minlength=VOCAB).float()
    seen = counts > 0
    seen[prompt] = True
    rep = params.repetition_penalty
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)


@pytest.mark.parametrize(
    "penalty",
    [
        dict(frequency_penalty=2.0),
        dict(presence_penalty=2.0),
        dict(repetition_penalty=2.0),
        dict(frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.3),
    ],
    ids=["frequency", "presence", "repetition", "all-three"],
)
def test_penalised_greedy_picks_the_argmax_of_the_penalised_logits(
    checkpoint, engine, repeating_case, penalty
):
    _, model = checkpoint
    prompt, plain = repeating_case
    params = greedy(12, ignore_eos=True, **penalty)

    tokens = tokens_of(generate_one(engine, prompt, params))

    assert tokens != plain
    with torch.no_grad():
        logits = model(torch.tensor([[*prompt, *tokens[:-1]]])).logits[0, len(prompt) - 1 :]
    for step, token in enumerate(tokens):
        adjusted = penalised(logits[step].float(), prompt, tokens[:step], params)
        assert adjusted[token] >= adjusted.max() - 1e-3, step


def test_high_frequency_penalty_avoids_tokens_greedy_repeats(engine, repeating_case):
    prompt, plain = repeating_case

    tokens = tokens_of(
        generate_one(engine, prompt, greedy(12, ignore_eos=True, frequency_penalty=2.0))
    )

    repeats = len(tokens) - len(set(tokens))
    assert repeats < len(plain) - len(set(plain))


def test_min_tokens_holds_back_stops_with_overlapped_steps(checkpoint):
    """With overlapped steps on the CPU the model runs on a worker thread while this
    thread marks the step's tokens pending and commits the previous step's; the sampling
    state is read before that, so ``min_tokens`` counts only tokens produced: no stop among
    the first ``min_tokens``, and every seeded sample equals the synchronous engine's (the
    worker read the state late, counted the step's own token and let a stop through one
    position early). Half the vocabulary stops, so an unmasked position often stops."""
    stops = list(range(3, VOCAB, 2))
    prompt = random_prompt(random.Random(11), 5)
    overlapped = make_engine(checkpoint[0], async_scheduling=True)
    synchronous = make_engine(checkpoint[0], async_scheduling=False)
    assert overlapped._worker is not None
    stopped_right_after = 0
    for seed in range(8):
        params = SamplingParams(
            temperature=1.0, seed=seed, max_tokens=8, min_tokens=4, stop_token_ids=stops
        )
        got = generate_one(overlapped, prompt, params)
        want = generate_one(synchronous, prompt, params)
        tokens = tokens_of(got)
        assert not set(tokens[:4]) & set(stops)
        assert (tokens, got[-1].finish_reason) == (tokens_of(want), want[-1].finish_reason)
        stopped_right_after += len(tokens) == 5 and got[-1].finish_reason == "stop"
    assert stopped_right_after > 0  # the first position a stop may take was reached
