"""Prefill/decode disaggregation in the engine core: a prompt's KV computed by one engine
and handed to another gives the same tokens and logprobs as one engine doing both, sends
only the blocks the receiver lacks, and a failed or aborted transfer leaks no block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_service.engine import LLMEngine, SamplingParams
from engine_service.engine.kv_handoff import KVChunk, KVExport, KVReserved, PrefillDone
from tests.engine_service.helpers import (
    assert_pool_entirely_free,
    greedy,
    make_engine,
    make_llama_checkpoint,
    run_all,
    tokens_of,
)

BLOCK = 4
# Small steps, so that a prompt is computed (and its blocks leave) over several steps.
SETTINGS = dict(block_size=BLOCK, num_kv_blocks=64, max_num_batched_tokens=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("handoff") / "llama"
    make_llama_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def engines(checkpoint: Path):
    made = [make_engine(checkpoint, **SETTINGS) for _ in range(3)]
    yield made
    for engine in made:
        engine.close()


def prompt_of(length: int, offset: int = 0) -> list[int]:
    return [(7 * i + 11 + offset) % 300 + 3 for i in range(length)]


def colocated(engine: LLMEngine, prompt: list[int], params: SamplingParams):
    outputs = list(engine.stream("colocated", prompt, params))
    return tokens_of(outputs), [lp for o in outputs for lp in (o.new_logprobs or [])]


def hand_off(
    prefill: LLMEngine,
    decode: LLMEngine,
    request_id: str,
    prompt: list[int],
    params: SamplingParams,
    *,
    tamper=None,
    abort_after_chunks: int | None = None,
):
    """Run one request disaggregated: the decode engine reserves, the prefill engine computes
    and exports, every chunk goes (through ``tamper``, when given) into the decode engine.
    Returns the decode engine's outputs, the chunks sent and the prefill's last word."""
    decode.add_request(request_id, prompt, params, import_kv=True)
    reserved = None
    while reserved is None:
        decode.step()
        reserved = next(
            (e for e in decode.take_handoff_events() if isinstance(e, KVReserved)), None
        )
    assert decode.only_awaiting_kv()
    prefill.add_request(request_id, prompt, params, kv_export=KVExport(reserved.num_held_blocks))
    chunks: list[KVChunk] = []
    done: PrefillDone | None = None
    while done is None:
        prefill.step()
        for event in prefill.take_handoff_events():
            if isinstance(event, KVChunk):
                chunks.append(event)
                blocks = tamper(event.blocks) if tamper else event.blocks
                decode.receive_kv(request_id, event.first_block, blocks)
                if abort_after_chunks is not None and len(chunks) >= abort_after_chunks:
                    prefill.abort(request_id)
                    decode.abort(request_id)
                    return {}, chunks, None
            elif isinstance(event, PrefillDone):
                done = event
    run_all(prefill)
    decode.finish_kv_import(request_id, done.token_id, done.logprob, done.generator_state)
    return run_all(decode), chunks, done


def free_everything(*engines: LLMEngine) -> None:
    for engine in engines:
        assert not engine.has_unfinished()
        assert_pool_entirely_free(engine.kv_manager)


@pytest.mark.parametrize(
    "params",
    [
        greedy(12),
        SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=12),
        SamplingParams(temperature=0.0, max_tokens=8, logprobs=3),
        SamplingParams(temperature=1.0, seed=3, max_tokens=10, logprobs=2, presence_penalty=0.5),
    ],
    ids=["greedy", "seeded", "logprobs", "seeded-logprobs-penalty"],
)
def test_handed_off_prompt_generates_what_one_engine_does(engines, params) -> None:
    reference, prefill, decode = engines
    prompt = prompt_of(37)
    want_tokens, want_logprobs = colocated(reference, prompt, params)

    outputs, chunks, done = hand_off(prefill, decode, "r", prompt, params)

    got = outputs[("r", 0)]
    assert tokens_of(got) == want_tokens
    got_logprobs = [lp for o in got for lp in (o.new_logprobs or [])]
    assert len(got_logprobs) == len(want_logprobs)
    for a, b in zip(got_logprobs, want_logprobs, strict=True):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    # 37 tokens in 4-token blocks over 8-token steps: ten blocks, in several chunks, in order.
    assert len(chunks) > 1
    assert [c.first_block for c in chunks] == sorted(c.first_block for c in chunks)
    assert sum(c.blocks.shape[0] for c in chunks) == 10 == done.num_blocks_sent
    assert done.bytes_sent == sum(c.blocks.numel() * c.blocks.element_size() for c in chunks)
    assert got[-1].finished
    free_everything(prefill, decode)
    for engine in (reference, prefill, decode):
        engine.kv_manager.reset_prefix_cache()


def test_blocks_the_decode_engine_holds_are_not_sent(engines) -> None:
    reference, prefill, decode = engines
    shared = prompt_of(24)
    first, second = shared + prompt_of(5, 1), shared + prompt_of(9, 2)
    # The decode engine ends the first request holding the shared blocks in its prefix cache.
    hand_off(prefill, decode, "a", first, greedy(4))
    prefill.kv_manager.reset_prefix_cache()  # the prefill engine computes everything again
    want, _ = colocated(reference, second, greedy(6))

    outputs, chunks, done = hand_off(prefill, decode, "b", second, greedy(6))

    assert tokens_of(outputs[("b", 0)]) == want
    held = len(shared) // BLOCK  # six full blocks of the shared prefix
    assert chunks[0].first_block == held
    assert done.num_blocks_sent == -(-len(second) // BLOCK) - held
    assert decode.stats().handoff.skipped_blocks >= held
    free_everything(prefill, decode)


def test_a_chunk_of_the_wrong_shape_makes_the_decode_engine_recompute(engines) -> None:
    reference, prefill, decode = engines
    prompt = prompt_of(30, 3)
    want, _ = colocated(reference, prompt, greedy(8))
    failures = decode.stats().handoff.import_failures

    def truncate_heads(blocks: torch.Tensor) -> torch.Tensor:
        return blocks[..., :1, :].contiguous()

    outputs, _, _ = hand_off(prefill, decode, "bad", prompt, greedy(8), tamper=truncate_heads)

    assert tokens_of(outputs[("bad", 0)]) == want
    assert decode.stats().handoff.import_failures == failures + 1
    free_everything(prefill, decode)


def test_a_failed_transfer_frees_the_reservation_and_recomputes(engines) -> None:
    reference, _, decode = engines
    prompt = prompt_of(21, 4)
    want, _ = colocated(reference, prompt, greedy(5))
    decode.add_request("lost", prompt, greedy(5), import_kv=True)
    decode.step()
    assert any(isinstance(e, KVReserved) for e in decode.take_handoff_events())
    used = decode.kv_manager.num_blocks - decode.kv_manager.num_free_blocks
    assert used == -(-len(prompt) // BLOCK)

    assert decode.fail_kv_import("lost", "the prefill engine went away")
    outputs = run_all(decode)

    assert tokens_of(outputs[("lost", 0)]) == want
    free_everything(decode)


@pytest.mark.parametrize("abort_after_chunks", [1, 2])
def test_abort_during_transfer_frees_both_sides(engines, abort_after_chunks) -> None:
    _, prefill, decode = engines
    prompt = prompt_of(40, 5)

    _, chunks, done = hand_off(
        prefill, decode, "gone", prompt, greedy(5), abort_after_chunks=abort_after_chunks
    )

    assert done is None and len(chunks) == abort_after_chunks
    run_all(prefill)
    run_all(decode)
    free_everything(prefill, decode)
    # A late chunk or first token for the aborted request is ignored.
    assert not decode.receive_kv("gone", chunks[-1].first_block, chunks[-1].blocks)
    assert not decode.finish_kv_import("gone", 5)


def test_a_first_token_that_ends_the_request_ends_it_on_the_decode_engine(engines) -> None:
    reference, prefill, decode = engines
    prompt = prompt_of(13, 6)
    first = tokens_of(list(reference.stream("probe", prompt, greedy(1))))[0]
    params = greedy(6, stop_token_ids=[first])

    outputs, _, _ = hand_off(prefill, decode, "short", prompt, params)

    got = outputs[("short", 0)]
    assert tokens_of(got) == [first]
    assert got[-1].finish_reason == "stop" and got[-1].stop_token_id == first
    free_everything(prefill, decode)


def test_disaggregated_requests_take_one_sample(engines) -> None:
    _, prefill, decode = engines
    with pytest.raises(ValueError, match="n == 1"):
        decode.add_request("n2", prompt_of(8), greedy(3, n=2), import_kv=True)
    with pytest.raises(ValueError, match="n == 1"):
        prefill.add_request("n2", prompt_of(8), greedy(3, n=2), kv_export=KVExport())


def test_an_export_gets_no_step_past_its_prompt_with_overlapped_steps(engines) -> None:
    """With overlapped steps the host schedules step N+1 while step N runs. A prefill
    engine's export ends with the first token that step N samples, so step N+1 must not take
    it: it would be wasted work, and for a seeded request it would draw from the generator
    whose state the prefill hands to the decode engine (the decode engine then skipped a
    draw, and its sampled tokens came out one position late)."""
    reference, prefill, decode = engines
    assert prefill.async_scheduling
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=12)
    prompt = prompt_of(23, offset=5)
    scheduled: list[tuple[int, int]] = []  # (start, tokens) of the export's chunks
    schedule = prefill.scheduler.schedule

    def recording():
        batch = schedule()
        scheduled.extend(
            (seq.start, seq.num_tokens) for seq in batch.sequences if seq.request.request_id == "x"
        )
        return batch

    prefill.scheduler.schedule = recording
    try:
        outputs, _, _ = hand_off(prefill, decode, "x", prompt, params)
    finally:
        prefill.scheduler.schedule = schedule

    # Chunks up to the prompt's end (after any prefix-cache hit), and nothing past it.
    assert scheduled and max(start + n for start, n in scheduled) == len(prompt)
    assert tokens_of(outputs[("x", 0)]) == colocated(reference, prompt, params)[0]
    free_everything(prefill, decode)
