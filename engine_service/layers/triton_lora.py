"""Batched LoRA on CUDA: Triton shrink and expand kernels over tokens grouped by adapter.

The step's tokens carry an adapter slot each (``-1``: the base model). :func:`group_tokens`
sorts them by slot on the device, without reading anything back to the host: the token ids
in slot order, and per slot its token count and the start of its run. Both kernels then run
one program per (block of ``BLOCK_M`` tokens of one slot's run, slot, ...), the grid sized
by the step's token count and the slot count, so it has a fixed shape for a given batch and
needs no host sync:

- **shrink**: ``h[p, t] = A[p, slot(t)] x[t]`` for every output piece ``p`` of the layer (a
  stacked qkv projection has three), ``[BLOCK_M, K] x [K, R]`` tile products, fp32 out;
- **expand**: ``y[t, piece p] += h[p, t] B[p, slot(t)]`` in place, ``[BLOCK_M, R] x [R, N]``.

Programs whose block lies past their slot's run return at once, so a prefill segment of one
adapter (SGMV's case) and a decode batch of many adapters (BGMV's case) are the same kernel.
Tokens of the base model are in no run: their rows of ``y`` are not touched. Ranks below the
slots' padded ``max_rank`` are zero rows of ``A`` and ``B`` (as in the torch reference), so
adapters of different ranks share one launch.

CI has no GPU: the tests run these kernels under Triton's interpreter on the CPU, against
:class:`~engine_service.layers.lora.TorchLoRA`; ``bench/gpu_check.py`` compares them on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def group_tokens(token_slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, ...]:
    """``(sorted_tokens [T] int32, counts [S] int32, starts [S] int32)``: token ids ordered
    by slot (base tokens last), each slot's token count and the offset of its run."""
    key = torch.where(token_slots < 0, num_slots, token_slots)
    sorted_tokens = torch.argsort(key, stable=True).to(torch.int32)
    # scatter_add, not bincount: bincount reads its input's maximum back on CUDA.
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=key.device)
    counts = counts.scatter_add_(0, key, torch.ones_like(key))[:num_slots]
    starts = torch.cumsum(counts, 0) - counts
    return sorted_tokens, counts.to(torch.int32), starts.to(torch.int32)


@triton.jit
def _run_tokens(sorted_ptr, starts_ptr, slot, block, count, BLOCK_M: tl.constexpr):
    """Block ``block`` of ``slot``'s run of token ids (int64) and which rows are real."""
    start = tl.load(starts_ptr + slot)
    offs = block * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = offs < count
    tokens = tl.load(sorted_ptr + start + offs, mask=valid, other=0).to(tl.int64)
    return tokens, valid


@triton.jit(do_not_specialize=["num_tokens"])
def _shrink_kernel(
    x_ptr,
    a_ptr,
    h_ptr,
    sorted_ptr,
    counts_ptr,
    starts_ptr,
    num_tokens,
    in_features,
    stride_x,
    NUM_SLOTS: tl.constexpr,
    RANK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr,
):
    block = tl.program_id(0)
    piece = tl.program_id(1)
    slot = tl.program_id(2)
    count = tl.load(counts_ptr + slot)
    if block * BLOCK_M >= count:
        return
    tokens, valid = _run_tokens(sorted_ptr, starts_ptr, slot, block, count, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < RANK
    a_base = a_ptr + ((piece * NUM_SLOTS + slot) * RANK).to(tl.int64) * in_features
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < in_features
        x = tl.load(
            x_ptr + tokens[:, None] * stride_x + cols[None, :],
            mask=valid[:, None] & col_ok[None, :],
            other=0.0,
        )
        a = tl.load(
            a_base + ranks[None, :] * in_features + cols[:, None],
            mask=col_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        if IEEE:
            acc += tl.dot(x, a, input_precision="ieee")
        else:
            acc += tl.dot(x, a)
    h_rows = (piece * num_tokens + tokens) * RANK
    tl.store(
        h_ptr + h_rows[:, None] + ranks[None, :],
        acc,
        mask=valid[:, None] & rank_ok[None, :],
    )


@triton.jit(do_not_specialize=["num_tokens", "y_offset"])
def _expand_kernel(
    h_ptr,
    b_ptr,
    y_ptr,
    sorted_ptr,
    counts_ptr,
    starts_ptr,
    num_tokens,
    piece,
    out_features,
    stride_y,
    y_offset,
    RANK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr,
):
    block = tl.program_id(0)
    col_block = tl.program_id(1)
    slot = tl.program_id(2)
    count = tl.load(counts_ptr + slot)
    if block * BLOCK_M >= count:
        return
    tokens, valid = _run_tokens(sorted_ptr, starts_ptr, slot, block, count, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < RANK
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < out_features
    h = tl.load(
        h_ptr + ((piece * num_tokens + tokens) * RANK)[:, None] + ranks[None, :],
        mask=valid[:, None] & rank_ok[None, :],
        other=0.0,
    )
    b = tl.load(
        b_ptr + (slot * RANK + ranks[:, None]).to(tl.int64) * out_features + cols[None, :],
        mask=rank_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    if IEEE:
        delta = tl.dot(h, b.to(tl.float32), input_precision="ieee")
    else:
        # Half-precision operands on the tensor cores, as the torch path rounds h too.
        delta = tl.dot(h.to(b.dtype), b)
    y_ptrs = y_ptr + tokens[:, None] * stride_y + y_offset + cols[None, :]
    mask = valid[:, None] & col_ok[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)


def _block_m(num_tokens: int) -> int:
    return 16 if num_tokens <= 16 else 32 if num_tokens <= 256 else 64


def lora_shrink(
    x: torch.Tensor, lora_a_all: torch.Tensor, groups: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """``h [pieces, T, rank]`` fp32: each token's ``A x`` under its own slot, every piece.
    Rows of base tokens are left unwritten. ``lora_a_all`` is ``[pieces, slots, rank, in]``."""
    sorted_tokens, counts, starts = groups
    pieces, num_slots, rank, in_features = lora_a_all.shape
    num_tokens = x.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    h = torch.empty(pieces, num_tokens, rank, dtype=torch.float32, device=x.device)
    block_m = _block_m(num_tokens)
    grid = (triton.cdiv(num_tokens, block_m), pieces, num_slots)
    _shrink_kernel[grid](
        x,
        lora_a_all,
        h,
        sorted_tokens,
        counts,
        starts,
        num_tokens,
        in_features,
        x.stride(0),
        NUM_SLOTS=num_slots,
        RANK=rank,
        BLOCK_M=block_m,
        BLOCK_K=64,
        BLOCK_R=max(16, triton.next_power_of_2(rank)),
        IEEE=x.dtype == torch.float32,
    )
    return h


def lora_expand(
    h: torch.Tensor,
    piece: int,
    lora_b: torch.Tensor,
    groups: tuple[torch.Tensor, ...],
    y: torch.Tensor,
    y_offset: int,
) -> None:
    """``y[t, y_offset : y_offset + out] += h[piece, t] B[slot(t)]`` in place for every token
    with an adapter; ``lora_b`` is ``[slots, rank, out]`` (B transposed, scale folded in)."""
    sorted_tokens, counts, starts = groups
    num_slots, rank, out_features = lora_b.shape
    num_tokens = h.shape[1]
    assert y.stride(1) == 1, "LoRA expand writes rows of a row-major output"
    block_m = _block_m(num_tokens)
    block_n = 64
    grid = (triton.cdiv(num_tokens, block_m), triton.cdiv(out_features, block_n), num_slots)
    _expand_kernel[grid](
        h,
        lora_b,
        y,
        sorted_tokens,
        counts,
        starts,
        num_tokens,
        piece,
        out_features,
        y.stride(0),
        y_offset,
        RANK=rank,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=max(16, triton.next_power_of_2(rank)),
        IEEE=lora_b.dtype == torch.float32,
    )


def add_lora_delta(
    x: torch.Tensor,
    y: torch.Tensor,
    token_slots: torch.Tensor,
    lora_a_all: torch.Tensor,
    lora_b: list[torch.Tensor],
    widths: list[int],
    groups: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """One layer's whole delta: shrink every piece at once, then expand each into its
    columns of ``y`` (in place; ``y`` is returned). ``groups`` (from :func:`group_tokens`)
    may be shared by every layer of a step."""
    if groups is None:
        groups = group_tokens(token_slots, lora_a_all.shape[1])
    h = lora_shrink(x, lora_a_all, groups)
    offset = 0
    for piece, (b, width) in enumerate(zip(lora_b, widths)):
        lora_expand(h, piece, b, groups, y, offset)
        offset += width
    return y
