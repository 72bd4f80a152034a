"""The MoE kernels against the per-expert loop: the grouped torch kernel (the CPU path) and
the fused Triton kernel, which runs here under Triton's interpreter in a child process (see
``triton_interpreter.py``); on a GPU, ``bench/gpu_check.py`` checks it in bf16.

Routings are built to catch addressing mistakes: experts that get no token, experts that
get more rows than one tile, sizes that are not multiples of the tiles, a token whose top-k
are all the same few experts, biases and gpt-oss's clamped activation.
"""

from __future__ import annotations

import functools

import pytest
import torch

from engine_service.layers.moe import (
    SWIGLU_OAI,
    LoopMoEKernel,
    TorchMoEKernel,
    gated_activation,
    select_experts,
)
from tests.engine_service.triton_interpreter import InterpretedTriton

moe_triton = pytest.importorskip("engine_service.layers.moe_triton")


def make_case(
    num_tokens, hidden, inner, num_experts, top_k, *, bias=False, dtype=torch.float32, seed=0
):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    x = randn(num_tokens, hidden)
    w13 = randn(num_experts, 2 * inner, hidden, scale=hidden**-0.5 * 2)
    w2 = randn(num_experts, hidden, inner, scale=inner**-0.5)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    logits[:, num_experts - 1] = -1e4  # the last expert never gets a token
    weights, ids = select_experts(logits, top_k, renormalize=True)
    biases = (randn(num_experts, 2 * inner), randn(num_experts, hidden)) if bias else (None, None)
    return x, w13, w2, weights, ids, biases


def loop(x, w13, w2, weights, ids, act, biases):
    return LoopMoEKernel().forward(x, w13, w2, weights, ids, act, *biases)


def test_loop_equals_a_per_token_definition():
    x, w13, w2, weights, ids, biases = make_case(7, 24, 16, 5, 2, bias=True)
    glu = gated_activation(SWIGLU_OAI)
    expected = torch.zeros_like(x)
    for t in range(7):
        for j in range(2):
            e = int(ids[t, j])
            gate, up = (w13[e] @ x[t] + biases[0][e]).chunk(2)
            expected[t] += weights[t, j] * (w2[e] @ glu(gate, up) + biases[1][e])
    torch.testing.assert_close(loop(x, w13, w2, weights, ids, SWIGLU_OAI, biases), expected)


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", SWIGLU_OAI])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_torch_kernel_equals_the_loop(act, bias):
    x, w13, w2, weights, ids, biases = make_case(29, 40, 24, 6, 3, bias=bias)
    got = TorchMoEKernel().forward(x, w13, w2, weights, ids, act, *biases)
    torch.testing.assert_close(got, loop(x, w13, w2, weights, ids, act, biases))


def test_grouped_torch_kernel_handles_no_tokens():
    x, w13, w2, weights, ids, _ = make_case(0, 16, 8, 4, 2)
    assert TorchMoEKernel().forward(x, w13, w2, weights, ids, "silu").shape == (0, 16)


def test_alignment_puts_every_pair_once_in_its_experts_tiles():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2], [3, 1]])
    aligned = moe_triton.align_by_expert(ids, num_experts=6, block_m=4)
    num_pairs = ids.numel()
    pairs = aligned.sorted_pairs
    assert pairs.numel() % 4 == 0 and pairs.numel() >= num_pairs
    assert sorted(p for p in pairs.tolist() if p < num_pairs) == list(range(num_pairs))
    flat = ids.flatten()
    for tile, expert in enumerate(aligned.tile_expert.tolist()):
        members = [p for p in pairs[tile * 4 : tile * 4 + 4].tolist() if p < num_pairs]
        if expert < 0:
            assert members == []
        else:
            assert members and all(int(flat[p]) == expert for p in members)
    # Expert 3 has 5 pairs: two tiles; experts 0, 1, 2 one each; 4 and 5 none.
    assert sorted(e for e in aligned.tile_expert.tolist() if e >= 0) == [0, 1, 2, 3, 3]


@pytest.fixture(scope="module")
def interpreted_moe():
    """``fused_moe`` with its kernels run by Triton's interpreter in a child process."""
    interpreter = InterpretedTriton()
    yield functools.partial(interpreter.call, "engine_service.layers.moe_triton:fused_moe")
    interpreter.close()


@pytest.mark.parametrize(
    ("num_tokens", "hidden", "inner", "num_experts", "top_k", "act", "bias"),
    [
        (3, 32, 32, 8, 2, "silu", False),  # decode-like: most experts idle
        (37, 40, 24, 6, 3, "silu", False),  # ragged sizes, experts over one tile
        (21, 48, 40, 5, 2, SWIGLU_OAI, True),  # gpt-oss: biases, clamped SwiGLU
        (9, 16, 48, 4, 4, "gelu_pytorch_tanh", False),  # every expert for every token
    ],
)
def test_fused_triton_kernel_equals_the_loop(
    interpreted_moe, num_tokens, hidden, inner, num_experts, top_k, act, bias
):
    x, w13, w2, weights, ids, biases = make_case(
        num_tokens, hidden, inner, num_experts, top_k, bias=bias
    )
    got = interpreted_moe(x, w13, w2, weights, ids, act, *biases)
    torch.testing.assert_close(got, loop(x, w13, w2, weights, ids, act, biases))


def test_fused_triton_kernel_in_half_precision(interpreted_moe):
    # fp16, not bf16: the interpreter computes bf16 dots wrongly (see test_extend_kernel.py).
    x, w13, w2, weights, ids, _ = make_case(19, 32, 32, 4, 2, dtype=torch.float16, seed=3)
    got = interpreted_moe(x, w13, w2, weights, ids, "silu")
    assert got.dtype == torch.float16
    expected = loop(x.float(), w13.float(), w2.float(), weights, ids, "silu", (None, None))
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)
