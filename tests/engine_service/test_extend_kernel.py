"""The paged extend attention kernel equals a dense-mask SDPA reference on random ragged batches.

CI has no GPU, so the real Triton kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``,
numpy on the CPU) in a child process (see ``triton_interpreter.py``), so that this process and
the other tests keep Triton as they found it. The interpreter computes bf16 dots wrongly (Triton 3.9), so the half-precision case uses fp16;
bf16 is checked on the GPU by ``bench/gpu_check.py``.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

from tests.engine_service.extend_reference import (
    SequenceSpec,
    build_case,
    dense_reference,
    mixed_specs,
)
from tests.engine_service.triton_interpreter import InterpretedTriton

ExtendConfig = pytest.importorskip("engine_service.engine.triton_extend").ExtendConfig

SCALE = 0.3


@pytest.fixture(scope="module")
def extend_attention():
    """``paged_extend_attention``, its kernel run by Triton's interpreter in a child process."""
    interpreter = InterpretedTriton()
    yield functools.partial(
        interpreter.call, "engine_service.engine.triton_extend:paged_extend_attention"
    )
    interpreter.close()


def run_both(extend_attention, case, window=None):
    out = extend_attention(case.q, case.kv_cache, case.layer, case.meta, SCALE, window)
    ref = dense_reference(case.q, case.kv_cache, case.layer, case.meta, SCALE, window)
    return out, ref


def small_case(specs, *, group=4, head_dim=16, block_size=4, dtype=torch.float32, seed=0, **kw):
    return build_case(
        specs,
        num_kv_heads=2,
        group=group,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        seed=seed,
        **kw,
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_decodes_chunks_and_prompts_match_reference(extend_attention, seed):
    specs = mixed_specs(random.Random(seed), num_seqs=6, max_context=45, max_query=20)
    out, ref = run_both(extend_attention, small_case(specs, seed=seed))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decode_only_batch_matches_reference(extend_attention):
    specs = [SequenceSpec(n, 1) for n in (1, 3, 16, 17, 40)]
    out, ref = run_both(extend_attention, small_case(specs, group=8))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_padding_sequences_without_rows_are_skipped(extend_attention):
    # Captured graphs pad the batch with sequences of no query rows and no context.
    specs = [SequenceSpec(10, 3), SequenceSpec(0, 0), SequenceSpec(5, 1), SequenceSpec(0, 0)]
    out, ref = run_both(extend_attention, small_case(specs))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# Tiles of 8 queries (x 4 heads) and 32 keys. The lengths put key-tile edges where an
# off-by-one in the mask-free range shows: at the causal diagonal (c + j0 + 2 = 96 and 32)
# and, with the window of 40, one tile past what the latest row of a query tile may see.
@pytest.mark.parametrize("window", [None, 40])
def test_long_chunks_span_several_query_and_key_tiles(extend_attention, window):
    specs = [SequenceSpec(94, 64), SequenceSpec(6, 58), SequenceSpec(0, 40)]
    out, ref = run_both(extend_attention, small_case(specs, block_size=8), window=window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [6, 50])  # shorter and longer than a key tile
def test_sliding_window_hides_keys_by_position(extend_attention, window):
    specs = mixed_specs(random.Random(2), num_seqs=6, max_context=60, max_query=30)
    case = small_case(specs, seed=2)
    out, ref = run_both(extend_attention, case, window=window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    unwindowed = dense_reference(case.q, case.kv_cache, case.layer, case.meta, SCALE, None)
    assert not torch.allclose(out, unwindowed, atol=1e-3)  # the window mattered


def test_token_trees_follow_the_custom_mask(extend_attention):
    specs = mixed_specs(random.Random(3), num_seqs=8, max_context=30, max_query=12, trees=True)
    assert any(s.tree for s in specs)
    case = small_case(specs, seed=3)
    out, ref = run_both(extend_attention, case)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # A tree is not a chain: the same rows under a causal mask give something else.
    causal = small_case(specs, seed=3, custom_mask=False)
    chain = dense_reference(causal.q, causal.kv_cache, causal.layer, causal.meta, SCALE, None)
    assert not torch.allclose(out, chain, atol=1e-3)


def test_token_trees_with_a_sliding_window(extend_attention):
    specs = [SequenceSpec(20, 10, tree=True), SequenceSpec(9, 7, tree=True), SequenceSpec(12, 1)]
    out, ref = run_both(extend_attention, small_case(specs, seed=4), window=5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_causal_triangle_as_custom_mask_equals_plain_causal(extend_attention):
    specs = mixed_specs(random.Random(5), num_seqs=5, max_context=30, max_query=15)
    plain = small_case(specs, seed=5)
    masked = small_case(specs, seed=5, custom_mask=True)
    assert plain.meta.custom_mask is None and masked.meta.custom_mask is not None
    out_plain = extend_attention(plain.q, plain.kv_cache, plain.layer, plain.meta, SCALE, None)
    out_masked = extend_attention(masked.q, masked.kv_cache, masked.layer, masked.meta, SCALE, None)
    torch.testing.assert_close(out_masked, out_plain, atol=1e-5, rtol=1e-5)


def test_group_and_head_dim_that_are_not_powers_of_two(extend_attention):
    specs = mixed_specs(random.Random(6), num_seqs=4, max_context=20, max_query=10)
    out, ref = run_both(extend_attention, small_case(specs, group=3, head_dim=24, seed=6), window=9)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("trees", "window"), [(False, None), (False, 7), (True, None)])
def test_keys_split_across_programs_combine_exactly(extend_attention, trees, window):
    # Flash-decoding: 4 programs share each query tile's key tiles of 16, some get none.
    specs = mixed_specs(random.Random(8), num_seqs=5, max_context=70, max_query=12, trees=trees)
    specs.append(SequenceSpec(1, 1))
    case = small_case(specs, seed=8)
    split = ExtendConfig(rows=32, block_n=16, num_warps=4, num_stages=1, num_splits=4)
    out = extend_attention(case.q, case.kv_cache, case.layer, case.meta, SCALE, window, split)
    ref = dense_reference(case.q, case.kv_cache, case.layer, case.meta, SCALE, window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_half_precision_uses_the_tensor_core_path(extend_attention):
    specs = mixed_specs(random.Random(7), num_seqs=5, max_context=40, max_query=16, trees=True)
    out, ref = run_both(extend_attention, small_case(specs, dtype=torch.float16, seed=7))
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


def test_mismatched_cache_is_rejected(extend_attention):
    case = small_case([SequenceSpec(3, 2)])
    with pytest.raises(ValueError, match="KV heads"):
        extend_attention(case.q[:, :3], case.kv_cache, case.layer, case.meta, SCALE, None)
    with pytest.raises(ValueError, match="num_blocks, num_layers, 2"):
        extend_attention(case.q, case.kv_cache[:, 0], case.layer, case.meta, SCALE, None)


# Attention sinks (gpt-oss): one logit per query head in every softmax, with no value. They
# are drawn around the scores' size, so that they change the outputs by a visible amount.
def random_sinks(num_heads, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + seed)
    return (torch.randn(num_heads, generator=gen) * 1.5).to(dtype)


def assert_sinks_mattered(case, out, window):
    plain = dense_reference(case.q, case.kv_cache, case.layer, case.meta, SCALE, window)
    assert not torch.allclose(out, plain, atol=1e-3)


@pytest.mark.parametrize("window", [None, 6])
def test_sinks_join_each_heads_softmax(extend_attention, window):
    specs = mixed_specs(random.Random(20), num_seqs=6, max_context=45, max_query=20)
    case = small_case(specs, seed=20)
    sinks = random_sinks(case.q.shape[1], 20)
    out = extend_attention(case.q, case.kv_cache, case.layer, case.meta, SCALE, window, None, sinks)
    ref = dense_reference(case.q, case.kv_cache, case.layer, case.meta, SCALE, window, sinks)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert_sinks_mattered(case, out, window)


def test_sinks_with_a_group_that_is_not_a_power_of_two(extend_attention):
    # Three query heads per KV head padded to four rows: the padding rows' sinks are never
    # read from memory, the real heads each get their own.
    specs = [SequenceSpec(n, 1) for n in (1, 5, 17)] + [SequenceSpec(9, 6), SequenceSpec(0, 11)]
    case = small_case(specs, group=3, head_dim=24, seed=21)
    sinks = random_sinks(case.q.shape[1], 21)
    out = extend_attention(case.q, case.kv_cache, case.layer, case.meta, SCALE, 9, None, sinks)
    ref = dense_reference(case.q, case.kv_cache, case.layer, case.meta, SCALE, 9, sinks)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_sinks_with_token_trees(extend_attention, window):
    specs = mixed_specs(random.Random(22), num_seqs=8, max_context=30, max_query=12, trees=True)
    case = small_case(specs, seed=22)
    sinks = random_sinks(case.q.shape[1], 22)
    out = extend_attention(case.q, case.kv_cache, case.layer, case.meta, SCALE, window, None, sinks)
    ref = dense_reference(case.q, case.kv_cache, case.layer, case.meta, SCALE, window, sinks)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("trees", "window", "num_splits"),
    [(False, None, 4), (False, 7, 4), (True, None, 4), (False, None, 16), (True, 7, 2)],
)
def test_sinks_count_once_across_key_splits(extend_attention, trees, window, num_splits):
    # Each split folds its keys alone; the sink belongs to split 0 only, so the log-sum-exp
    # merge sees it once. With 16 splits of 16-key tiles most splits of a short sequence
    # hold no key at all, and a windowed decode can leave split 0 itself keyless.
    specs = mixed_specs(random.Random(23), num_seqs=5, max_context=70, max_query=12, trees=trees)
    specs += [SequenceSpec(1, 1), SequenceSpec(60, 1)]
    case = small_case(specs, seed=23)
    sinks = random_sinks(case.q.shape[1], 23)
    split = ExtendConfig(rows=32, block_n=16, num_warps=4, num_stages=1, num_splits=num_splits)
    out = extend_attention(
        case.q, case.kv_cache, case.layer, case.meta, SCALE, window, split, sinks
    )
    ref = dense_reference(case.q, case.kv_cache, case.layer, case.meta, SCALE, window, sinks)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert_sinks_mattered(case, out, window)


def test_sinks_in_half_precision(extend_attention):
    specs = mixed_specs(random.Random(24), num_seqs=5, max_context=40, max_query=16, trees=True)
    case = small_case(specs, dtype=torch.float16, seed=24)
    sinks = random_sinks(case.q.shape[1], 24, torch.float16)
    out = extend_attention(case.q, case.kv_cache, case.layer, case.meta, SCALE, None, None, sinks)
    ref = dense_reference(case.q, case.kv_cache, case.layer, case.meta, SCALE, None, sinks)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


def test_sinks_of_the_wrong_shape_are_rejected(extend_attention):
    case = small_case([SequenceSpec(3, 2)])
    with pytest.raises(ValueError, match="one logit per query head"):
        extend_attention(
            case.q, case.kv_cache, case.layer, case.meta, SCALE, None, None, torch.zeros(2)
        )


def test_warm_up_launches_every_tile_shape_split_and_window_variant():
    """Engines call ``warm_up`` at start so no serving step waits on Triton's JIT."""
    interpreter = InterpretedTriton()
    try:
        kv_cache = torch.randn(4, 1, 2, 4, 2, 8)
        launches = interpreter.call(
            "engine_service.engine.triton_extend:warm_up", kv_cache, 4, {None, 6}, 16
        )
    finally:
        interpreter.close()
    # Two tile shapes in fp32 (one-row decodes, 32-row extends) x five splits x two windows.
    assert launches == 2 * 5 * 2


def test_warm_up_with_sinks_compiles_the_sinks_variants():
    interpreter = InterpretedTriton()
    try:
        kv_cache = torch.randn(4, 1, 2, 4, 2, 8)
        launches = interpreter.call(
            "engine_service.engine.triton_extend:warm_up", kv_cache, 4, {None, 6}, 16, True
        )
    finally:
        interpreter.close()
    assert launches == 2 * 5 * 2


def test_warm_up_with_token_trees_compiles_the_custom_mask_variants():
    """Engines that verify token trees warm the custom-mask variants too (each tile shape the
    masked path picks, every split and window), on a causal triangle given as a mask."""
    from engine_service.engine.triton_extend import pick_config

    masked_shapes = {pick_config(q, 2, 16, torch.float32, True) for q in (1, 2, 4, 8, 16)}
    interpreter = InterpretedTriton()
    try:
        kv_cache = torch.randn(4, 1, 2, 4, 2, 8)
        launches = interpreter.call(
            "engine_service.engine.triton_extend:warm_up", kv_cache, 4, {None, 6}, 16, False, True
        )
    finally:
        interpreter.close()
    assert launches == (2 + len(masked_shapes)) * 5 * 2
