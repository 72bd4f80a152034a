"""The Triton LoRA shrink/expand kernels equal the per-token definition of the delta.

CI has no GPU, so the kernels run under Triton's interpreter (numpy on the CPU) in a child
process (``triton_interpreter.py``); the interpreter computes bf16 dots wrongly (Triton 3.9),
so half precision is checked in fp16 here and in bf16 by ``bench/gpu_check.py`` on CUDA.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.engine_service.triton_interpreter import InterpretedTriton

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def lora_delta():
    interpreter = InterpretedTriton()
    yield functools.partial(interpreter.call, "engine_service.layers.triton_lora:add_lora_delta")
    interpreter.close()


def make_case(slots, in_features, widths, num_slots, max_rank, ranks, dtype, seed=0):
    """Random A/B padded to ``max_rank`` (slot ``s`` uses ``ranks[s]`` rows, the rest zero,
    as the engine stores adapters of smaller rank), inputs and a base output."""
    gen = torch.Generator().manual_seed(seed)
    pieces = len(widths)
    lora_a = torch.zeros(pieces, num_slots, max_rank, in_features)
    lora_b = [torch.zeros(num_slots, max_rank, w) for w in widths]
    for s in range(num_slots):
        r = ranks[s]
        lora_a[:, s, :r] = torch.randn(pieces, r, in_features, generator=gen) / in_features**0.5
        for b in lora_b:
            b[s, :r] = torch.randn(r, b.shape[2], generator=gen) / r**0.5
    token_slots = torch.tensor(slots, dtype=torch.int64)
    x = torch.randn(len(slots), in_features, generator=gen)
    y = torch.randn(len(slots), sum(widths), generator=gen)
    return (
        x.to(dtype),
        y.to(dtype),
        token_slots,
        lora_a.to(dtype),
        [b.to(dtype) for b in lora_b],
        list(widths),
    )


def reference(x, y, token_slots, lora_a, lora_b, widths):
    """The definition, token by token, in fp32."""
    out = y.float().clone()
    for t, slot in enumerate(token_slots.tolist()):
        if slot < 0:
            continue
        offset = 0
        for p, (b, w) in enumerate(zip(lora_b, widths)):
            h = lora_a[p, slot].float() @ x[t].float()
            out[t, offset : offset + w] += h @ b[slot].float()
            offset += w
    return out


CASES = {
    # decodes of several adapters and the base model, one token each (BGMV's case)
    "decode_mixed": ([2, -1, 0, 2, 1, -1, 0, 3], 64, [64, 32, 32], 4, 16, [16, 8, 16, 4]),
    # a prefill segment of one adapter beside base tokens, several token blocks (SGMV's case)
    "prefill_segments": ([-1] * 7 + [1] * 70 + [0] * 3 + [-1] * 5, 48, [40], 2, 8, [8, 8]),
    # sizes that are not powers of two, rank above 16
    "odd_sizes": ([0, 0, 1, -1, 1, 1, 0], 72, [40, 24, 24], 2, 24, [24, 20]),
    # more tokens than one block of 64 for a slot
    "long_run": ([0] * 150 + [1] * 20, 32, [32, 16], 2, 16, [16, 16]),
    # a wide input: the shrink's reduction split in two ranges, the last one short
    "split_reduction": ([1, -1, 0, 1, 0, 0], 600, [24, 40], 2, 16, [16, 8]),
    # four pieces: two expand launches
    "four_pieces": ([0, 1, -1, 1], 32, [16, 24, 8, 16], 2, 8, [8, 4]),
    # a rank whose three pieces do not fit one shrink tile: two shrink launches
    "wide_rank": ([1, 0, -1, 1, 1], 40, [24, 16, 16], 2, 96, [96, 64]),
    # every slot partly fills a block, and one slot is unused
    "sparse_slots": ([3, 0, 3, -1, 0, 3] * 7, 48, [32], 5, 8, [8, 4, 8, 8, 2]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_equal_the_definition_fp32(lora_delta, name):
    case = make_case(*CASES[name], dtype=torch.float32)
    expected = reference(*case)
    out = lora_delta(*case)
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4), (out - expected).abs().max()


def test_kernels_equal_the_definition_fp16(lora_delta):
    case = make_case(*CASES["decode_mixed"], dtype=torch.float16, seed=3)
    expected = reference(*case)
    out = lora_delta(*case)
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), expected, atol=2e-2, rtol=1e-2)


def test_base_tokens_rows_are_untouched(lora_delta):
    slots = [-1, 0, -1, -1, 1, -1]
    x, y, token_slots, lora_a, lora_b, widths = make_case(
        slots, 32, [16, 16], 2, 16, [16, 16], dtype=torch.float32, seed=5
    )
    out = lora_delta(x, y.clone(), token_slots, lora_a, lora_b, widths)
    base = torch.tensor([s < 0 for s in slots])
    assert torch.equal(out[base], y[base])
    assert not torch.allclose(out[~base], y[~base])


def test_a_step_without_adapter_tokens_changes_nothing(lora_delta):
    x, y, token_slots, lora_a, lora_b, widths = make_case(
        [-1] * 9, 32, [16], 2, 16, [16, 16], dtype=torch.float32
    )
    assert torch.equal(lora_delta(x, y.clone(), token_slots, lora_a, lora_b, widths), y)


def test_grouping_orders_tokens_by_slot_and_cuts_runs_into_blocks():
    from engine_service.layers.triton_lora import group_tokens

    slots = torch.tensor([1, -1, 0, 1, 0, -1, 2] + [1] * 20)
    groups = group_tokens(slots, 3)
    assert groups.block_m == 32
    assert groups.sorted_tokens[:5].tolist() == [2, 4, 0, 3, 7]
    # one block per slot (2, 22 and 1 tokens), then the table's unused tail
    used = groups.block_rows > 0
    assert groups.block_slot[used].tolist() == [0, 1, 2]
    assert groups.block_row[used].tolist() == [0, 2, 24]
    assert groups.block_rows[used].tolist() == [2, 22, 1]
    assert groups.block_rows.shape[0] == 1 + 3 and used.sum() == 3


def test_grouping_of_long_runs_covers_every_token_once():
    from engine_service.layers.triton_lora import group_tokens

    gen = torch.Generator().manual_seed(1)
    slots = torch.randint(-1, 4, (700,), generator=gen)
    groups = group_tokens(slots, 4)
    covered = []
    for slot, row, rows in zip(
        groups.block_slot.tolist(), groups.block_row.tolist(), groups.block_rows.tolist()
    ):
        assert rows <= groups.block_m
        tokens = groups.sorted_tokens[row : row + rows].tolist()
        assert all(slots[t] == slot for t in tokens)
        covered += tokens
    assert sorted(covered) == [t for t in range(700) if slots[t] >= 0]


def test_warm_up_runs_each_layer_shape_once_per_tile_size(monkeypatch):
    """Start-up compiles the kernels: one delta per distinct layer shape, at a step size of
    each tile class, on slot 0 (the launcher is recorded here, not run)."""
    from engine_service.layers import triton_lora
    from engine_service.layers.linear import QKVParallelLinear, RowParallelLinear
    from engine_service.layers.lora import LoRASlots, TritonLoRA, warm_up_triton

    launches = []
    monkeypatch.setattr(
        triton_lora,
        "add_lora_delta",
        lambda x, y, slots, a, b, widths: launches.append(
            (x.shape, y.shape, slots.tolist(), tuple(a.shape), tuple(widths))
        ),
    )
    slots = LoRASlots()
    qkv = [TritonLoRA(QKVParallelLinear(32, 8, 4, 2), slots, 2, 8) for _ in range(3)]
    down = TritonLoRA(RowParallelLinear(48, 32), slots, 2, 8)
    assert warm_up_triton([*qkv, down]) == 6
    assert sorted({n for (n, _), *_ in launches}) == [1, 17, 257]
    assert {(tuple(y), widths) for _, y, _, _, widths in launches} == {
        ((1, 64), (32, 16, 16)), ((17, 64), (32, 16, 16)), ((257, 64), (32, 16, 16)),
        ((1, 32), (32,)), ((17, 32), (32,)), ((257, 32), (32,)),
    }  # fmt: skip
    assert all(set(s) == {0} for _, _, s, _, _ in launches)
