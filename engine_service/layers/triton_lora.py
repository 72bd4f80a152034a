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


@triton.jit(do_not_specialize=["num_tokens", "k_per_split"])
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
    k_per_split,
    NUM_SLOTS: tl.constexpr,
    PIECES: tl.constexpr,
    RANK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr,
):
    block = tl.program_id(0)
    slot = tl.program_id(1)
    split = tl.program_id(2)
    count = tl.load(counts_ptr + slot)
    if block * BLOCK_M >= count:
        return
    tokens, valid = _run_tokens(sorted_ptr, starts_ptr, slot, block, count, BLOCK_M)
    # Column j of the tile is rank j % RANK of piece j // RANK: every piece in one product.
    cols_r = tl.arange(0, BLOCK_R)
    piece = cols_r // RANK
    ranks = cols_r % RANK
    col_ok = cols_r < PIECES * RANK
    a_rows = ((piece * NUM_SLOTS + slot) * RANK + ranks).to(tl.int64) * in_features
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        x = tl.load(
            x_ptr + tokens[:, None] * stride_x + ks[None, :],
            mask=valid[:, None] & k_ok[None, :],
            other=0.0,
        )
        a = tl.load(
            a_ptr + a_rows[None, :] + ks[:, None],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if IEEE:
            acc += tl.dot(x, a, input_precision="ieee")
        else:
            acc += tl.dot(x, a)
    # h is [splits, pieces, T, RANK]: each split writes its own partial sums (no atomics,
    # so the result does not depend on the order programs finish in).
    h_rows = ((split * PIECES + piece[None, :]) * num_tokens + tokens[:, None]) * RANK
    tl.store(h_ptr + h_rows + ranks[None, :], acc, mask=valid[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["num_tokens"])
def _expand_kernel(
    h_ptr,
    b0_ptr,
    b1_ptr,
    b2_ptr,
    y_ptr,
    sorted_ptr,
    counts_ptr,
    starts_ptr,
    num_tokens,
    stride_y,
    width0,
    width1,
    width2,
    NUM_SLOTS: tl.constexpr,
    PIECES: tl.constexpr,
    SPLITS: tl.constexpr,
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
    # Which piece this column block falls in: blocks never straddle two pieces.
    blocks0 = tl.cdiv(width0, BLOCK_N)
    blocks1 = tl.cdiv(width1, BLOCK_N)
    # Runtime values from the start (not constants), so that the branches can reassign them.
    piece = col_block * 0
    b_ptr = b0_ptr
    width = width0 + piece
    y_offset = piece
    local_block = col_block
    if PIECES > 1:  # noqa: SIM102 - a compile-time branch around a runtime one
        if col_block >= blocks0:
            piece = 1
            b_ptr = b1_ptr
            width = width1
            y_offset = width0
            local_block = col_block - blocks0
    if PIECES > 2:  # noqa: SIM102 - a compile-time branch around a runtime one
        if col_block >= blocks0 + blocks1:
            piece = 2
            b_ptr = b2_ptr
            width = width2
            y_offset = width0 + width1
            local_block = col_block - blocks0 - blocks1
    tokens, valid = _run_tokens(sorted_ptr, starts_ptr, slot, block, count, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < RANK
    cols = local_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width
    h = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for split in tl.static_range(SPLITS):
        h_rows = ((split * PIECES + piece) * num_tokens + tokens) * RANK
        h += tl.load(
            h_ptr + h_rows[:, None] + ranks[None, :],
            mask=valid[:, None] & rank_ok[None, :],
            other=0.0,
        )
    b = tl.load(
        b_ptr + (slot * RANK + ranks[:, None]).to(tl.int64) * width + cols[None, :],
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


# Enough programs to fill an H100/H200's 132 SMs: the shrink's reduction over the input
# features is split when a step has few token blocks (decode), since one program walking
# all of K alone is bound by its loads' latency.
_TARGET_PROGRAMS = 128
_MAX_SPLITS = 8
_BLOCK_K = 64


def _splits(num_tokens: int, in_features: int) -> int:
    blocks = triton.cdiv(num_tokens, _block_m(num_tokens))
    splits = max(1, min(_MAX_SPLITS, _TARGET_PROGRAMS // blocks))
    return max(1, min(splits, triton.cdiv(in_features, 4 * _BLOCK_K)))


def lora_shrink(
    x: torch.Tensor, lora_a_all: torch.Tensor, groups: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """``h [splits, pieces, T, rank]`` fp32: each token's ``A x`` under its own slot, every
    piece, as partial sums over ``splits`` ranges of the input features (the expand adds
    them). Rows of base tokens are left unwritten. ``lora_a_all`` is
    ``[pieces, slots, rank, in]``."""
    sorted_tokens, counts, starts = groups
    pieces, num_slots, rank, in_features = lora_a_all.shape
    num_tokens = x.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    splits = _splits(num_tokens, in_features)
    k_per_split = triton.cdiv(triton.cdiv(in_features, splits), _BLOCK_K) * _BLOCK_K
    h = torch.empty(splits, pieces, num_tokens, rank, dtype=torch.float32, device=x.device)
    block_m = _block_m(num_tokens)
    grid = (triton.cdiv(num_tokens, block_m), num_slots, splits)
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
        k_per_split,
        NUM_SLOTS=num_slots,
        PIECES=pieces,
        RANK=rank,
        BLOCK_M=block_m,
        BLOCK_K=_BLOCK_K,
        BLOCK_R=max(16, triton.next_power_of_2(pieces * rank)),
        IEEE=x.dtype == torch.float32,
    )
    return h


def lora_expand(
    h: torch.Tensor,
    lora_b: list[torch.Tensor],
    groups: tuple[torch.Tensor, ...],
    y: torch.Tensor,
) -> None:
    """``y[t, piece p's columns] += h[:, p, t].sum(0) B_p[slot(t)]`` in place for every
    token with an adapter and up to three pieces in one launch; each ``lora_b`` is
    ``[slots, rank, out_p]`` (B transposed, scale folded in), the pieces' columns side by
    side in ``y``."""
    sorted_tokens, counts, starts = groups
    splits, pieces, num_tokens, rank = h.shape
    assert pieces == len(lora_b) <= 3, "the expand kernel takes one to three pieces"
    assert y.stride(1) == 1, "LoRA expand writes rows of a row-major output"
    num_slots = lora_b[0].shape[0]
    widths = [b.shape[2] for b in lora_b] + [0] * (3 - pieces)
    padded = list(lora_b) + [lora_b[0]] * (3 - pieces)
    block_m = _block_m(num_tokens)
    block_n = 64
    col_blocks = sum(triton.cdiv(w, block_n) for w in widths)
    grid = (triton.cdiv(num_tokens, block_m), col_blocks, num_slots)
    _expand_kernel[grid](
        h,
        padded[0],
        padded[1],
        padded[2],
        y,
        sorted_tokens,
        counts,
        starts,
        num_tokens,
        y.stride(0),
        widths[0],
        widths[1],
        widths[2],
        NUM_SLOTS=num_slots,
        PIECES=pieces,
        SPLITS=splits,
        RANK=rank,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=max(16, triton.next_power_of_2(rank)),
        IEEE=lora_b[0].dtype == torch.float32,
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
    """One layer's whole delta: shrink every piece at once, then expand them into their
    columns of ``y`` (in place; ``y`` is returned), three pieces per launch. ``groups``
    (from :func:`group_tokens`) may be shared by every layer of a step."""
    if groups is None:
        groups = group_tokens(token_slots, lora_a_all.shape[1])
    assert [b.shape[2] for b in lora_b] == list(widths)
    h = lora_shrink(x, lora_a_all, groups)
    offset = 0
    for first in range(0, len(lora_b), 3):
        chunk = lora_b[first : first + 3]
        width = sum(b.shape[2] for b in chunk)
        lora_expand(
            h[:, first : first + 3].contiguous(), chunk, groups, y[:, offset : offset + width]
        )
        offset += width
    return y
