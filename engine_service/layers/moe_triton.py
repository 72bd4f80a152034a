"""The fused mixture-of-experts kernel for CUDA: tokens sorted by expert, two grouped GEMMs.

Routing ``ids [T, k]`` gives ``P = T * k`` (token, slot) pairs; pair ``p`` is token ``p // k``.
:func:`align_by_expert` sorts the pairs by expert and pads every expert's run to a multiple of
the tile height ``BLOCK_M``, so that each tile of rows belongs to one expert::

    padded position   0 ........ 16 ........ 32 ........ 48 ...... bound
    sorted_pairs      [ e0 pairs | pad ][ e2 pairs ........ | pad ][ unused: sentinel P ]
    tile_expert       [    0     ][    2     ][    2     ][  -1 (past the padded total) ]

The buffers are sized by a bound known on the host, ``P + min(E, P) * (BLOCK_M - 1)``, and
filled on the device (no host synchronisation), so a decode step captures into a CUDA graph.

Then two kernels, one program per (row tile, column tile):

1. ``_gate_up_kernel``: ``inter[pos] = f(x[token] W_gate[e]^T + b, x[token] W_up[e]^T + b)``,
   gate and up accumulated side by side in one program so the activation ``f`` is applied
   before anything is written; ``inter`` is indexed by padded position, so the next GEMM reads
   contiguous rows.
2. ``_down_kernel``: ``out_pairs[p] = weight[p] * (inter[pos] W_down[e]^T + b)``.

The weighted combine is a sum over each token's ``k`` rows of ``out_pairs``. Accumulation is in
fp32; fp32 inputs use IEEE-precision dots (no TF32), so the kernel can be checked exactly
against the loop under Triton's interpreter on the CPU (``tests/engine_service/test_moe_kernels.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine_service.layers.moe import (
    SWIGLU_OAI,
    SWIGLU_OAI_ALPHA,
    SWIGLU_OAI_LIMIT,
    MoEKernel,
)

# Activation codes of the kernel's ACT constexpr.
_ACT_CODES = {"silu": 0, "gelu": 1, "gelu_pytorch_tanh": 2, SWIGLU_OAI: 3}


@dataclass(frozen=True, slots=True)
class ExpertAlignment:
    """Pairs sorted by expert and padded per expert to ``block_m`` (see the module diagram)."""

    sorted_pairs: torch.Tensor  # [bound] int32: pair index, or P for padding
    tile_expert: torch.Tensor  # [bound // block_m] int32: expert of each tile, -1 past the end
    block_m: int


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """Sort the routing's pairs by expert, each expert's run padded to ``block_m`` rows."""
    flat = ids.flatten()
    num_pairs = flat.numel()
    device = flat.device
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    bound = triton.cdiv(bound, block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount without a host sync
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    experts = flat[order]
    rank = torch.arange(num_pairs, device=device) - start[experts]
    sorted_pairs = torch.full((bound,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[padded_start[experts] + rank] = order.to(torch.int32)
    tile_starts = torch.arange(0, bound, block_m, device=device)
    tile_expert = torch.searchsorted(padded_end, tile_starts, right=True)
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, -1).to(torch.int32)
    return ExpertAlignment(sorted_pairs, tile_expert, block_m)


@triton.jit
def _activate(gate, up, ACT: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr):
    if ACT == 0:  # silu
        return gate * tl.sigmoid(gate) * up
    elif ACT == 1:  # gelu (erf)
        return 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)) * up
    elif ACT == 2:  # gelu, tanh approximation: 0.5 g (1 + tanh(z)) = g * sigmoid(2 z)
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        return gate * tl.sigmoid(2.0 * z) * up
    else:  # gpt-oss's clamped SwiGLU
        gate = tl.minimum(gate, LIMIT)
        up = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
        return (up + 1.0) * gate * tl.sigmoid(gate * ALPHA)


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    inter_ptr,
    sorted_pairs_ptr,
    tile_expert_ptr,
    num_pairs,
    hidden,
    inner,
    stride_x_tok,
    stride_w_e,
    stride_w_n,
    stride_w_k,
    stride_b_e,
    stride_i_row,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    ALPHA: tl.constexpr,
    LIMIT: tl.constexpr,
    IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    if expert < 0:
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    row_ok = pairs < num_pairs
    tokens = (pairs // TOP_K).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inner
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_x_tok + ks[None, :]
    # [BLOCK_K, BLOCK_N] tiles of W^T: gate rows ``cols``, up rows ``inner + cols``.
    w_base = w_ptr + expert * stride_w_e + ks[:, None] * stride_w_k
    gate_ptrs = w_base + cols[None, :] * stride_w_n
    up_ptrs = w_base + (inner + cols[None, :]) * stride_w_n
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = ks < hidden - k0
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(gate_ptrs, mask=w_mask, other=0.0)
        w_up = tl.load(up_ptrs, mask=w_mask, other=0.0)
        if IEEE:
            acc_gate = tl.dot(x, w_gate, acc_gate, input_precision="ieee")
            acc_up = tl.dot(x, w_up, acc_up, input_precision="ieee")
        else:
            acc_gate = tl.dot(x, w_gate, acc_gate)
            acc_up = tl.dot(x, w_up, acc_up)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K * stride_w_k
        up_ptrs += BLOCK_K * stride_w_k
    if HAS_BIAS:
        bias = bias_ptr + expert * stride_b_e
        acc_gate += tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_up += tl.load(bias + inner + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = _activate(acc_gate, acc_up, ACT, ALPHA, LIMIT)
    tl.store(
        inter_ptr + rows.to(tl.int64)[:, None] * stride_i_row + cols[None, :],
        out.to(inter_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _down_kernel(
    inter_ptr,
    w_ptr,
    bias_ptr,
    weights_ptr,
    out_ptr,
    sorted_pairs_ptr,
    tile_expert_ptr,
    num_pairs,
    hidden,
    inner,
    stride_i_row,
    stride_w_e,
    stride_w_n,
    stride_w_k,
    stride_b_e,
    stride_o_pair,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    if expert < 0:
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    row_ok = pairs < num_pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + rows.to(tl.int64)[:, None] * stride_i_row + ks[None, :]
    w_ptrs = w_ptr + expert * stride_w_e + ks[:, None] * stride_w_k + cols[None, :] * stride_w_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inner, BLOCK_K):
        k_ok = ks < inner - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_w_k
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_b_e + cols, mask=col_ok, other=0.0).to(
            tl.float32
        )[None, :]
    weight = tl.load(weights_ptr + pairs, mask=row_ok, other=0.0)
    acc = acc * weight[:, None]
    tl.store(
        out_ptr + pairs.to(tl.int64)[:, None] * stride_o_pair + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@dataclass(frozen=True, slots=True)
class MoETiles:
    """Tile shape of both GEMMs: ``block_m`` routed rows, ``block_n`` output columns,
    ``block_k`` of the reduction per step (all powers of two, at least 16)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def pick_tiles(num_pairs: int, num_experts: int, dtype: torch.dtype) -> MoETiles:
    """Small tiles when each expert gets few rows (decode: the weights' bandwidth is the
    cost and padding rows waste it), large ones for prefill-sized batches."""
    if dtype == torch.float32:
        # Correctness path (IEEE dots): small tiles keep fp32 operands in registers.
        return MoETiles(16, 32, 32, num_warps=4, num_stages=2)
    rows_per_expert = num_pairs / num_experts
    if rows_per_expert <= 16:
        return MoETiles(16, 64, 128, num_warps=4, num_stages=4)
    if rows_per_expert <= 64:
        return MoETiles(32, 64, 64, num_warps=4, num_stages=4)
    return MoETiles(64, 128, 64, num_warps=8, num_stages=3)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    hidden_act: str = "silu",
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    tiles: MoETiles | None = None,
) -> torch.Tensor:
    """The :class:`~engine_service.layers.moe.MoEKernel` contract on Triton: ``x [T, H]``,
    ``w13 [E, 2I, H]``, ``w2 [E, H, I]``, ``weights``/``ids [T, k]`` to ``[T, H]``."""
    if hidden_act not in _ACT_CODES:
        raise ValueError(
            f"expert activation {hidden_act!r} is not supported by the fused MoE kernel; "
            f"supported: {', '.join(_ACT_CODES)}"
        )
    num_tokens, hidden = x.shape
    num_experts, two_inner, _ = w13.shape
    inner = two_inner // 2
    top_k = ids.shape[1]
    if w13.shape[2] != hidden or w2.shape != (num_experts, hidden, inner):
        raise ValueError(
            f"expert weights w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not fit x {tuple(x.shape)}"
        )
    if num_tokens == 0:
        return torch.zeros_like(x)
    x = x.contiguous()
    num_pairs = num_tokens * top_k
    tiles = tiles or pick_tiles(num_pairs, num_experts, x.dtype)
    aligned = align_by_expert(ids, num_experts, tiles.block_m)
    num_tiles = aligned.tile_expert.numel()
    inter = torch.empty(aligned.sorted_pairs.numel(), inner, dtype=x.dtype, device=x.device)
    out_pairs = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    ieee = x.dtype == torch.float32
    _gate_up_kernel[(num_tiles, triton.cdiv(inner, tiles.block_n))](
        x,
        w13,
        w13_bias if w13_bias is not None else w13,
        inter,
        aligned.sorted_pairs,
        aligned.tile_expert,
        num_pairs,
        hidden,
        inner,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        w13.stride(2),
        w13_bias.stride(0) if w13_bias is not None else 0,
        inter.stride(0),
        TOP_K=top_k,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        HAS_BIAS=w13_bias is not None,
        ACT=_ACT_CODES[hidden_act],
        ALPHA=SWIGLU_OAI_ALPHA,
        LIMIT=SWIGLU_OAI_LIMIT,
        IEEE=ieee,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    _down_kernel[(num_tiles, triton.cdiv(hidden, tiles.block_n))](
        inter,
        w2,
        w2_bias if w2_bias is not None else w2,
        weights.to(torch.float32).contiguous(),
        out_pairs,
        aligned.sorted_pairs,
        aligned.tile_expert,
        num_pairs,
        hidden,
        inner,
        inter.stride(0),
        w2.stride(0),
        w2.stride(1),
        w2.stride(2),
        w2_bias.stride(0) if w2_bias is not None else 0,
        out_pairs.stride(0),
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        HAS_BIAS=w2_bias is not None,
        IEEE=ieee,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out_pairs.view(num_tokens, top_k, hidden).sum(dim=1)


class TritonMoEKernel(MoEKernel):
    """:func:`fused_moe` behind the kernel seam (the CUDA default)."""

    name = "triton"

    def forward(self, x, w13, w2, weights, ids, hidden_act, w13_bias=None, w2_bias=None):
        return fused_moe(x, w13, w2, weights, ids, hidden_act, w13_bias, w2_bias)
