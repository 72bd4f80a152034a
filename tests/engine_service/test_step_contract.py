"""The step contract on a tiny random Llama: mixed steps, tail truncation, overlapped scheduling.

One ``ScheduledBatch`` carries decodes, prefill chunks and extends over cached prefixes in
one ragged batch; ``Scheduler.update`` alone commits progress; the overlapped engine (the
next step scheduled while the previous one runs) gives exactly the synchronous tokens.
"""

from __future__ import annotations

import random

import pytest

from engine_service.engine import LLMEngine, SamplingParams
from engine_service.engine.kv_cache import KVCacheManager
from tests.engine_service.helpers import (
    VOCAB,
    assert_pool_entirely_free,
    greedy,
    make_engine,
    make_llama_checkpoint,
    make_request,
    run_all,
    tokens_of,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-step-contract")
    make_llama_checkpoint(path)
    return path


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(length)]


def alone(checkpoint, prompt: list[int], params: SamplingParams) -> list[int]:
    engine = make_engine(checkpoint, enable_prefix_caching=False, async_scheduling=False)
    return engine.generate([prompt], params)[0][0]


def step_kinds(batch) -> set[str]:
    kinds = set()
    for seq in batch.sequences:
        if seq.num_tokens == 1 and seq.num_logits == 1:
            kinds.add("decode")
        elif seq.num_logits == 0:
            kinds.add("chunk")
        elif seq.start > 0:
            kinds.add("extend")
    return kinds


def test_a_step_mixing_decodes_chunks_and_cached_extends_equals_each_request_alone(checkpoint):
    engine = make_engine(checkpoint, max_num_batched_tokens=24, num_kv_blocks=96)
    rng = random.Random(0)
    shared = random_prompt(rng, 16)
    engine.generate([shared + random_prompt(rng, 3)], greedy(2))  # caches the shared blocks

    kinds_seen: list[set[str]] = []
    execute = engine.runner.execute

    def recording(batch, *args):
        kinds_seen.append(step_kinds(batch))
        return execute(batch, *args)

    engine.runner.execute = recording
    requests = {
        "decode": (random_prompt(rng, 5), greedy(14, ignore_eos=True)),
        "extend": (shared + random_prompt(rng, 6), greedy(6, ignore_eos=True)),
        "chunked": (random_prompt(rng, 60), greedy(4, ignore_eos=True)),
    }
    engine.add_request("decode", *requests["decode"])
    early = engine.step() + engine.step()
    engine.add_request("extend", *requests["extend"])
    engine.add_request("chunked", *requests["chunked"])
    outputs = run_all(engine)
    for output in early:
        outputs.setdefault((output.request_id, output.index), []).insert(0, output)

    assert any(kinds >= {"decode", "chunk", "extend"} for kinds in kinds_seen), kinds_seen
    for name, (prompt, params) in requests.items():
        assert tokens_of(outputs[(name, 0)]) == alone(checkpoint, prompt, params), name
    assert engine.scheduler.prefix_cache_hits >= 16


def test_truncating_a_tail_frees_its_blocks_and_leaves_the_prefix_cache_alone():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    request = make_request("r", list(range(10, 20)))  # 10 tokens: two full blocks
    assert kv.allocate_slots(request, 10)
    request.num_computed_tokens = 10
    kv.commit_computed_blocks(request)
    cached_before = sorted(kv.prefix_cache.block_hashes())
    free_before = kv.num_free_blocks

    # Seven draft tokens computed into two more blocks, then all but one rejected.
    assert kv.allocate_slots(request, 7)
    assert len(request.block_table) == 5
    kv.truncate(request, 11)

    assert len(request.block_table) == 3
    assert kv.num_free_blocks == free_before
    assert sorted(kv.prefix_cache.block_hashes()) == cached_before
    kv.free(request)
    assert_pool_entirely_free(kv)


def test_scheduler_truncate_drops_tokens_and_computed_count(checkpoint):
    engine = make_engine(checkpoint, async_scheduling=False)
    engine.add_request("r", list(range(10, 20)), greedy(20, ignore_eos=True))
    request = engine._samples["r"][0]
    for _ in range(4):
        engine.step()
    cached = sorted(engine.kv_manager.prefix_cache.block_hashes())
    num_tokens = request.num_tokens

    engine.scheduler.truncate(request, 12)

    assert request.num_tokens == 12 < num_tokens
    assert request.num_computed_tokens == 12
    assert len(request.block_table) == 3
    assert sorted(engine.kv_manager.prefix_cache.block_hashes()) == cached
    engine.abort("r")
    assert_pool_entirely_free(engine.kv_manager)


# -- overlapped scheduling ------------------------------------------------------------------


def workload(rng: random.Random) -> list[tuple[str, list[int], SamplingParams]]:
    jobs = []
    for i in range(6):
        params = (
            greedy(10 + i, ignore_eos=True)
            if i % 2
            else SamplingParams(n=1 + i % 3, seed=100 + i, temperature=0.9, max_tokens=9 + i)
        )
        jobs.append((f"r{i}", random_prompt(rng, 5 + 3 * i), params))
    return jobs


def drive(engine: LLMEngine, jobs, abort_from: int) -> tuple[dict, bool]:
    """Add the jobs two at a time; abort ``r3`` at the first step from ``abort_from`` on
    where it rides in the step in flight (at once when steps are synchronous). Returns the
    outputs and whether the abort hit a step in flight."""
    outputs: dict[tuple[str, int], list] = {}
    aborted_in_flight = aborted = False
    step = 0
    pending = list(jobs)
    while pending or engine.has_unfinished():
        for name, prompt, params in pending[:2]:
            engine.add_request(name, prompt, params)
        pending = pending[2:]
        flight = engine._in_flight
        in_flight = flight is not None and any(
            s.request.request_id == "r3" for s in flight.batch.sequences
        )
        if not aborted and step >= abort_from and (in_flight or flight is None):
            aborted_in_flight = in_flight
            aborted = engine.abort("r3")
        for output in engine.step():
            outputs.setdefault((output.request_id, output.index), []).append(output)
        step += 1
    return outputs, aborted_in_flight


def test_overlapped_scheduling_gives_the_synchronous_tokens_through_aborts_and_preemption(
    checkpoint,
):
    jobs = workload(random.Random(5))
    # A pool this small preempts sequences while their tokens are in flight.
    sync = make_engine(checkpoint, num_kv_blocks=14, async_scheduling=False)
    overlapped = make_engine(checkpoint, num_kv_blocks=14, async_scheduling=True)

    sync_out, _ = drive(sync, jobs, abort_from=4)
    overlapped_out, aborted_in_flight = drive(overlapped, jobs, abort_from=4)

    assert overlapped.scheduler.num_preemptions > 0
    assert aborted_in_flight
    kept = {key for key in sync_out if key[0] != "r3"}
    assert kept == {key for key in overlapped_out if key[0] != "r3"}
    for key in kept:
        assert tokens_of(overlapped_out[key]) == tokens_of(sync_out[key]), key
        assert overlapped_out[key][-1].finish_reason == sync_out[key][-1].finish_reason
    assert overlapped_out[("r3", 0)][-1].finish_reason == "abort"
    assert_pool_entirely_free(overlapped.kv_manager)
    overlapped.close()


def test_overlapped_steps_return_outputs_one_step_late_but_all_of_them(checkpoint):
    engine = make_engine(checkpoint, async_scheduling=True)
    engine.add_request("r", [5, 6, 7], greedy(4, ignore_eos=True))
    first = engine.step()
    assert first == []  # the first step's token is still in flight
    outputs = run_all(engine)
    assert len(tokens_of(outputs[("r", 0)])) == 4
    assert tokens_of(outputs[("r", 0)]) == alone(checkpoint, [5, 6, 7], greedy(4, ignore_eos=True))
    engine.close()
