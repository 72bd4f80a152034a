"""The scheduler, through the engine on a tiny random Llama: budgets, chunking, admission,
preemption, priority, abort, and input checks."""

from __future__ import annotations

import random

import pytest

from engine_service.engine import LLMEngine, SamplingParams
from engine_service.engine.request import Request, RequestStatus
from tests.engine_service.helpers import (
    VOCAB,
    assert_pool_entirely_free,
    greedy,
    make_engine,
    make_llama_checkpoint,
    run_all,
    tokens_of,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-scheduler")
    make_llama_checkpoint(path)
    return path


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(length)]


def record_steps(engine: LLMEngine) -> list[dict[tuple[str, int], int]]:
    """Per executed step: tokens computed for each (request id, sample index)."""
    steps: list[dict[tuple[str, int], int]] = []
    execute = engine.runner.execute

    def recording(batch, *args):
        steps.append(
            {(s.request.request_id, s.request.index): s.num_tokens for s in batch.sequences}
        )
        return execute(batch, *args)

    engine.runner.execute = recording
    return steps


def sample(engine: LLMEngine, request_id: str, index: int = 0) -> Request:
    return engine._samples[request_id][index]


# -- token budget and chunked prefill ---------------------------------------------------------


def test_step_token_budget_is_never_exceeded(checkpoint):
    engine = make_engine(checkpoint, max_num_batched_tokens=7)
    steps = record_steps(engine)
    rng = random.Random(0)
    for i, length in enumerate([3, 11, 20, 5, 1, 9]):
        engine.add_request(f"r{i}", random_prompt(rng, length), greedy(6, ignore_eos=True))

    outputs = run_all(engine)

    assert max(sum(step.values()) for step in steps) == 7
    assert all(len(tokens_of(outs)) == 6 for outs in outputs.values())


def test_long_prompt_is_chunked_while_a_running_decode_gets_a_token_every_step(checkpoint):
    # Synchronous steps: each step's outputs are known before the next is scheduled.
    engine = make_engine(checkpoint, max_num_batched_tokens=8, async_scheduling=False)
    steps = record_steps(engine)
    rng = random.Random(1)
    engine.add_request("decode", random_prompt(rng, 3), greedy(12, ignore_eos=True))
    decode = sample(engine, "decode")
    engine.step()
    engine.add_request("long", random_prompt(rng, 40), greedy(1))

    while not decode.is_finished:
        engine.step()

    during = steps[1:]
    assert all(step.get(("decode", 0)) == 1 for step in during)
    chunks = [step[("long", 0)] for step in during if ("long", 0) in step]
    assert len(chunks) >= 5
    assert all(chunk <= 7 for chunk in chunks)
    assert sum(chunks) == 40


def test_a_step_runs_at_most_max_num_seqs_sequences(checkpoint):
    engine = make_engine(checkpoint, max_num_seqs=2)
    steps = record_steps(engine)
    rng = random.Random(11)
    for i in range(4):
        engine.add_request(f"r{i}", random_prompt(rng, 4), greedy(3, ignore_eos=True))

    outputs = run_all(engine)

    assert max(len(step) for step in steps) == 2
    assert len(outputs) == 4


def test_long_prefill_threshold_lets_several_prompts_share_a_step(checkpoint):
    engine = make_engine(checkpoint, max_num_batched_tokens=16, long_prefill_token_threshold=5)
    steps = record_steps(engine)
    rng = random.Random(2)
    for name in ("a", "b", "c"):
        engine.add_request(name, random_prompt(rng, 12), greedy(1))

    engine.step()

    assert steps[0] == {("a", 0): 5, ("b", 0): 5, ("c", 0): 5}


def test_without_chunked_prefill_a_prompt_waits_until_it_fits_in_one_step(checkpoint):
    engine = make_engine(checkpoint, max_num_batched_tokens=10, enable_chunked_prefill=False)
    steps = record_steps(engine)
    rng = random.Random(3)
    engine.add_request("first", random_prompt(rng, 6), greedy(3, ignore_eos=True))
    engine.add_request("second", random_prompt(rng, 8), greedy(1))

    run_all(engine)

    assert steps[0] == {("first", 0): 6}
    assert 8 in [step.get(("second", 0)) for step in steps]
    assert all(sum(step.values()) <= 10 for step in steps)


# -- admission and preemption -----------------------------------------------------------------


def test_request_is_admitted_only_when_its_blocks_are_available(checkpoint):
    engine = make_engine(checkpoint, num_kv_blocks=6, block_size=4, async_scheduling=False)
    steps = record_steps(engine)
    rng = random.Random(4)
    engine.add_request("big", random_prompt(rng, 16), greedy(3, ignore_eos=True))
    engine.add_request("next", random_prompt(rng, 12), greedy(1))
    waiting = sample(engine, "next")

    finished_at = {}
    step_index = 0
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                finished_at[output.request_id] = step_index
        if waiting.status is RequestStatus.WAITING:
            assert waiting.block_table == []
        step_index += 1

    first_step_of_next = min(i for i, step in enumerate(steps) if ("next", 0) in step)
    assert first_step_of_next > finished_at["big"]
    assert engine.scheduler.num_preemptions == 0


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_pool_pressure_preempts_by_recompute_without_changing_outputs(
    checkpoint, enable_prefix_caching
):
    rng = random.Random(5)
    prompts = [random_prompt(rng, length) for length in (9, 12, 10, 11)]
    params = greedy(10, ignore_eos=True)

    def generate(engine: LLMEngine) -> list[list[list[int]]]:
        return engine.generate(prompts, params)

    roomy = generate(make_engine(checkpoint, num_kv_blocks=64))
    tight_engine = make_engine(
        checkpoint, num_kv_blocks=9, enable_prefix_caching=enable_prefix_caching
    )
    tight = generate(tight_engine)

    assert tight_engine.scheduler.num_preemptions > 0
    assert tight == roomy
    assert_pool_entirely_free(tight_engine.kv_manager)


def record_preemptions(engine: LLMEngine) -> list[str]:
    preempted: list[str] = []
    schedule = engine.scheduler.schedule

    def recording():
        batch = schedule()
        preempted.extend(r.request_id for r in batch.preempted)
        return batch

    engine.scheduler.schedule = recording
    return preempted


def test_pool_pressure_preempts_the_lower_priority_request(checkpoint):
    engine = make_engine(checkpoint, num_kv_blocks=7, block_size=4)
    preempted = record_preemptions(engine)
    rng = random.Random(6)
    engine.add_request("background", random_prompt(rng, 12), greedy(12, ignore_eos=True), 1)
    engine.add_request("urgent", random_prompt(rng, 12), greedy(12, ignore_eos=True), 0)

    outputs = run_all(engine)

    assert preempted
    assert set(preempted) == {"background"}
    assert all(len(tokens_of(outs)) == 12 for outs in outputs.values())


def test_pool_pressure_preempts_the_lower_priority_request_even_if_it_arrived_first(
    checkpoint,
):
    engine = make_engine(checkpoint, num_kv_blocks=7, block_size=4)
    preempted = record_preemptions(engine)
    rng = random.Random(6)
    engine.add_request("background", random_prompt(rng, 12), greedy(12, ignore_eos=True), 1)
    first_step = engine.step()
    engine.add_request("urgent", random_prompt(rng, 12), greedy(12, ignore_eos=True), 0)

    outputs = run_all(engine)
    outputs[("background", 0)] = first_step + outputs[("background", 0)]

    assert preempted
    assert set(preempted) == {"background"}
    assert all(len(tokens_of(outs)) == 12 for outs in outputs.values())


def test_identical_prompts_sampled_apart_finish_under_pool_pressure(checkpoint):
    """Both copies of the prompt miss the cache in the same step and compute the same
    blocks; after they diverge, the pool must still hand out every block it counts free."""
    engine = make_engine(checkpoint, num_kv_blocks=8, block_size=4)
    prompt = list(range(10, 18))
    engine.add_request("short", prompt, SamplingParams(max_tokens=5, seed=1, ignore_eos=True))
    engine.add_request("long", prompt, SamplingParams(max_tokens=20, seed=2, ignore_eos=True))

    outputs = run_all(engine)

    assert len(tokens_of(outputs[("long", 0)])) == 20
    assert_pool_entirely_free(engine.kv_manager)


# -- order ------------------------------------------------------------------------------------


def first_token_step(engine: LLMEngine) -> dict[str, int]:
    first: dict[str, int] = {}
    step_index = 0
    while engine.has_unfinished():
        for output in engine.step():
            if output.new_token_ids:
                first.setdefault(output.request_id, step_index)
        step_index += 1
    return first


def test_lower_priority_value_runs_first(checkpoint):
    engine = make_engine(checkpoint, max_num_batched_tokens=4)
    steps = record_steps(engine)
    rng = random.Random(7)
    engine.add_request("later", random_prompt(rng, 10), greedy(2), priority=1)
    engine.add_request("urgent", random_prompt(rng, 10), greedy(2), priority=0)

    first = first_token_step(engine)

    assert list(steps[0]) == [("urgent", 0)]
    assert first["urgent"] < first["later"]


def test_equal_priority_is_first_come_first_served(checkpoint):
    engine = make_engine(checkpoint, max_num_batched_tokens=4)
    steps = record_steps(engine)
    rng = random.Random(8)
    engine.add_request("first", random_prompt(rng, 10), greedy(2))
    engine.add_request("second", random_prompt(rng, 10), greedy(2))

    first = first_token_step(engine)

    assert list(steps[0]) == [("first", 0)]
    assert first["first"] < first["second"]


# -- abort ------------------------------------------------------------------------------------


def reach_waiting(engine: LLMEngine, rng: random.Random) -> int:
    engine.add_request("bystander", random_prompt(rng, 8), greedy(4, ignore_eos=True))
    engine.add_request("target", random_prompt(rng, 5), greedy(8, ignore_eos=True))
    engine.step()
    assert sample(engine, "target").status is RequestStatus.WAITING
    return 1


def reach_mid_prefill(engine: LLMEngine, rng: random.Random, n: int = 1) -> int:
    params = SamplingParams(n=n, max_tokens=8, seed=3, ignore_eos=True)
    engine.add_request("target", random_prompt(rng, 20), params)
    engine.add_request("bystander", random_prompt(rng, 8), greedy(4, ignore_eos=True))
    engine.step()
    target = sample(engine, "target")
    assert 0 < target.num_computed_tokens < target.num_prompt_tokens
    assert target.block_table
    assert len(target.pending_forks) == n - 1
    return n


def reach_mid_decode(engine: LLMEngine, rng: random.Random, n: int = 1) -> int:
    params = SamplingParams(n=n, max_tokens=8, seed=3, ignore_eos=True)
    engine.add_request("target", random_prompt(rng, 6), params)
    engine.add_request("bystander", random_prompt(rng, 8), greedy(4, ignore_eos=True))
    while sample(engine, "target").num_output_tokens < 3:
        engine.step()
    assert all(s.status is RequestStatus.RUNNING for s in engine._samples["target"])
    return n


STAGES = {
    "waiting": reach_waiting,
    "mid-prefill": reach_mid_prefill,
    "mid-prefill-with-pending-forks": lambda engine, rng: reach_mid_prefill(engine, rng, n=3),
    "mid-decode": reach_mid_decode,
    "mid-decode-with-forks": lambda engine, rng: reach_mid_decode(engine, rng, n=3),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_abort_at_any_point_frees_every_block_and_reports_abort(checkpoint, stage):
    engine = make_engine(checkpoint, max_num_batched_tokens=8)
    n = STAGES[stage](engine, random.Random(9))

    assert engine.abort("target")
    aborted = [o for o in engine.step() if o.request_id == "target"]
    rest = run_all(engine)

    assert sorted(o.index for o in aborted) == list(range(n))
    assert all(o.finished and o.finish_reason == "abort" for o in aborted)
    assert ("target", 0) not in rest
    assert rest[("bystander", 0)][-1].finish_reason == "length"
    assert_pool_entirely_free(engine.kv_manager)


def test_aborting_an_unknown_or_finished_request_returns_false(checkpoint):
    engine = make_engine(checkpoint)
    engine.add_request("done", [5, 6, 7], greedy(2))
    run_all(engine)

    assert not engine.abort("never-added")
    assert not engine.abort("done")
    assert engine.step() == []


# -- finishing --------------------------------------------------------------------------------


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_pool_is_entirely_free_after_every_request_finishes(checkpoint, enable_prefix_caching):
    engine = make_engine(
        checkpoint, max_num_batched_tokens=16, enable_prefix_caching=enable_prefix_caching
    )
    rng = random.Random(10)
    shared = random_prompt(rng, 9)
    engine.add_request("greedy", shared, greedy(7, ignore_eos=True))
    engine.add_request("same-prefix", [*shared, 4, 5], greedy(5))
    engine.add_request("forks", shared, SamplingParams(n=3, max_tokens=6, seed=1))
    engine.add_request("long", random_prompt(rng, 30), SamplingParams(max_tokens=3, seed=2))

    outputs = run_all(engine)

    assert len(outputs) == 6
    assert all(outs[-1].finished for outs in outputs.values())
    assert not engine.scheduler.running
    assert engine.scheduler.num_waiting == 0
    assert engine._samples == {}
    assert_pool_entirely_free(engine.kv_manager)


def test_max_model_len_stops_generation_with_length(checkpoint):
    engine = make_engine(checkpoint, max_model_len=12)

    outputs = run_all_of(engine, "r", list(range(10, 18)), greedy(50, ignore_eos=True))

    assert len(tokens_of(outputs)) == 4
    assert outputs[-1].finish_reason == "length"


def run_all_of(engine: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams):
    engine.add_request(request_id, prompt, params)
    return run_all(engine)[(request_id, 0)]


# -- input checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "params"),
    [
        pytest.param([], greedy(4), id="empty-prompt"),
        pytest.param([5, VOCAB], greedy(4), id="token-past-vocab"),
        pytest.param([-1, 5], greedy(4), id="negative-token"),
        pytest.param(list(range(3, 19)), greedy(4), id="prompt-fills-context"),
        pytest.param([5, 6], greedy(4, stop_token_ids=[VOCAB]), id="stop-token-past-vocab"),
    ],
)
def test_bad_input_raises_value_error_and_queues_nothing(checkpoint, prompt, params):
    engine = make_engine(checkpoint, max_model_len=16)

    with pytest.raises(ValueError):
        engine.add_request("bad", prompt, params)

    assert not engine.has_unfinished()
    assert engine.stats().prompt_tokens_total == 0


def test_duplicate_request_id_raises_and_keeps_the_first(checkpoint):
    engine = make_engine(checkpoint)
    engine.add_request("same", [5, 6, 7], greedy(3, ignore_eos=True))

    with pytest.raises(ValueError):
        engine.add_request("same", [8, 9], greedy(3))

    outputs = run_all(engine)
    assert list(outputs) == [("same", 0)]
    assert len(tokens_of(outputs[("same", 0)])) == 3


# -- the pool bounds the context --------------------------------------------------------------


def test_prompt_larger_than_the_whole_kv_pool_is_rejected(checkpoint):
    # 6 blocks of 4 tokens: no prompt of 24 tokens or more can ever be admitted.
    engine = make_engine(checkpoint, num_kv_blocks=6, block_size=4)

    with pytest.raises(ValueError):
        engine.add_request("huge", list(range(3, 33)), greedy(4))

    assert not engine.has_unfinished()


def test_generation_outgrowing_the_whole_kv_pool_finishes_with_length(checkpoint):
    engine = make_engine(checkpoint, num_kv_blocks=6, block_size=4)
    engine.add_request("grows", list(range(10, 18)), greedy(100, ignore_eos=True))

    outputs = []
    for _ in range(200):  # a request that can never be readmitted would spin forever
        if not engine.has_unfinished():
            break
        outputs.extend(engine.step())

    assert not engine.has_unfinished()
    assert outputs[-1].finish_reason == "length"
    assert 8 + len(tokens_of(outputs)) == 24
    assert_pool_entirely_free(engine.kv_manager)


# -- max_num_seqs counts every sample ---------------------------------------------------------


def test_n_beyond_max_num_seqs_is_rejected(checkpoint):
    engine = make_engine(checkpoint, max_num_seqs=4)

    with pytest.raises(ValueError):
        engine.add_request("wide", [5, 6, 7], SamplingParams(n=5, max_tokens=2))

    assert not engine.has_unfinished()


def test_samples_of_a_request_count_against_max_num_seqs(checkpoint):
    engine = make_engine(checkpoint, max_num_seqs=4)
    engine.add_request("one", [5, 6, 7], greedy(6, ignore_eos=True))
    engine.add_request("four", [8, 9, 10], SamplingParams(n=4, max_tokens=3, ignore_eos=True))

    most_running = 0
    while engine.has_unfinished():
        engine.step()
        most_running = max(most_running, len(engine.scheduler.running))

    assert most_running <= 4


def test_samples_yet_to_fork_from_a_chunked_prompt_keep_their_seats(checkpoint):
    """A prompt of n = 2 samples still in its chunks holds a seat for its second sample:
    a request arriving meanwhile waits rather than filling it, so the fork does not take the
    step past ``max_num_seqs`` (it did: four sequences in buffers for three, and the step
    failed). Every sample equals the one it gets alone."""
    engine = make_engine(checkpoint, max_num_seqs=3, long_prefill_token_threshold=9)
    params = {
        "a": greedy(1, ignore_eos=True),
        "b": SamplingParams(temperature=0.0, max_tokens=2, n=2, ignore_eos=True),
        "c": greedy(1, ignore_eos=True),
    }
    prompts = {"a": list(range(10, 50)), "b": list(range(60, 71)), "c": list(range(80, 102))}
    steps = record_steps(engine)
    engine.add_request("a", prompts["a"], params["a"])
    engine.step()
    engine.add_request("b", prompts["b"], params["b"])  # two chunks, then the fork
    engine.add_request("c", prompts["c"], params["c"])
    got = run_all(engine)

    assert max(len(step) for step in steps) <= 3
    for request_id, prompt in prompts.items():
        alone = make_engine(checkpoint)
        alone.add_request(request_id, prompt, params[request_id])
        expected = run_all(alone)
        for key, outputs in expected.items():
            assert tokens_of(got[key]) == tokens_of(outputs)
    assert set(got) == {("a", 0), ("b", 0), ("b", 1), ("c", 0)}
    assert_pool_entirely_free(engine.kv_manager)
