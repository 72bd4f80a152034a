"""Batched LoRA on CUDA: Triton shrink and expand kernels over tokens grouped by adapter.

The step's tokens carry an adapter slot each (``-1``: the base model). :func:`group_tokens`
sorts them by slot on the device, without reading anything back to the host, and cuts each
slot's run into blocks of ``BLOCK_M`` tokens: a short table of (slot, first row, rows) per
block, sized by the step's token count plus the slot count, so that its shape is fixed for a
given batch. Both kernels run one program per table entry (entries past the step's blocks
have no rows and return at once), and no program stands for a slot the step does not use:

- **shrink**: ``h[t, p, :] = A[p, slot(t)] x[t]`` for every output piece ``p`` of the layer
  (a stacked qkv projection has three) in one tile product ``[BLOCK_M, K] x [K, P * R]``, the
  reduction over the input features cut into ``splits`` ranges that separate programs sum
  (decode steps have few token blocks, and one program walking all of a 14336-wide input alone
  is bound by its loads' latency). Each range writes its own partial sums (fp32), so the
  result does not depend on the order programs finish in;
- **expand**: ``y[t, piece p] += (sum of the partial h[t, p]) B[p, slot(t)]`` in place,
  ``[BLOCK_M, R] x [R, BLOCK_N]`` tiles, up to three pieces in one launch.

Two launches per layer however many pieces and adapters, which matters most inside a CUDA
graph, where a decode step's deltas are a few microseconds of work each and the launches
themselves are the cost. A prefill segment of one adapter (SGMV's case) and a decode batch of
many adapters (BGMV's case) are the same kernels. Tokens of the base model are in no block:
their rows of ``y`` are not touched. Ranks below the slots' padded ``max_rank`` are zero rows
of ``A`` and ``B`` (as in the torch reference), so adapters of different ranks share a launch.
Every size that changes from step to step (token count, split count, table length) is a
run-time argument, so one compiled variant per tile shape serves every step.

CI has no GPU: the tests run these kernels under Triton's interpreter on the CPU, against
:class:`~engine_service.layers.lora.TorchLoRA`; ``bench/gpu_check.py`` compares them on CUDA
and ``bench/lora_kernels.py`` times them against the base projections.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class TokenGroups(NamedTuple):
    """A step's tokens grouped by adapter slot, shared by every LoRA layer of the step."""

    sorted_tokens: torch.Tensor  # [T] int32: token ids ordered by slot, base tokens last
    block_slot: torch.Tensor  # [B] int32: each block's slot
    block_row: torch.Tensor  # [B] int32: its first row in sorted_tokens
    block_rows: torch.Tensor  # [B] int32: its rows (0 for the table's unused tail)
    block_m: int  # tokens per block


def block_m(num_tokens: int) -> int:
    """Tokens per block: small tiles for decode steps, larger ones for prefill."""
    return 16 if num_tokens <= 16 else 32 if num_tokens <= 256 else 64


def group_tokens(token_slots: torch.Tensor, num_slots: int) -> TokenGroups:
    """Sort the step's tokens by slot and cut each slot's run into blocks (see the module's
    docstring); every operation stays on the device."""
    num_tokens = token_slots.shape[0]
    bm = block_m(num_tokens)
    device = token_slots.device
    key = torch.where(token_slots < 0, num_slots, token_slots)
    sorted_tokens = torch.argsort(key, stable=True).to(torch.int32)
    # scatter_add, not bincount: bincount reads its input's maximum back on CUDA.
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=device)
    counts = counts.scatter_add_(0, key, torch.ones_like(key))[:num_slots]
    starts = torch.cumsum(counts, 0) - counts
    blocks = (counts + bm - 1) // bm
    ends = torch.cumsum(blocks, 0)
    # At most one partly filled block per slot beyond the full ones.
    table = torch.arange(triton.cdiv(num_tokens, bm) + num_slots, device=device)
    slot = torch.searchsorted(ends, table, right=True)
    used = slot < num_slots
    slot = slot.clamp(max=num_slots - 1)
    within = table - (ends[slot] - blocks[slot])
    rows = torch.where(used, (counts[slot] - within * bm).clamp(0, bm), 0)
    return TokenGroups(
        sorted_tokens,
        slot.to(torch.int32),
        (starts[slot] + within * bm).to(torch.int32),
        rows.to(torch.int32),
        bm,
    )


@triton.jit
def _block_tokens(sorted_ptr, block_row_ptr, block, rows, BLOCK_M: tl.constexpr):
    """Block ``block``'s token ids (int64) and which of its ``BLOCK_M`` rows are real."""
    row = tl.load(block_row_ptr + block)
    offs = tl.arange(0, BLOCK_M)
    valid = offs < rows
    tokens = tl.load(sorted_ptr + row + offs, mask=valid, other=0).to(tl.int64)
    return tokens, valid


@triton.jit(do_not_specialize=["num_tokens", "k_per_split", "h_col0"])
def _shrink_kernel(
    x_ptr,
    a_ptr,
    h_ptr,
    sorted_ptr,
    block_slot_ptr,
    block_row_ptr,
    block_rows_ptr,
    num_tokens,
    in_features,
    stride_x,
    k_per_split,
    h_width,
    h_col0,
    NUM_SLOTS: tl.constexpr,
    PIECES: tl.constexpr,
    RANK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr,
):
    block = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.load(block_rows_ptr + block)
    if rows == 0:
        return
    slot = tl.load(block_slot_ptr + block)
    tokens, valid = _block_tokens(sorted_ptr, block_row_ptr, block, rows, BLOCK_M)
    # Column j of the tile is rank j % RANK of piece j // RANK: every piece in one product.
    cols = tl.arange(0, BLOCK_R)
    piece = cols // RANK
    col_ok = cols < PIECES * RANK
    a_rows = ((piece * NUM_SLOTS + slot) * RANK + cols % RANK).to(tl.int64) * in_features
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
    # h is [splits, T, h_width]; this launch's pieces start at column h_col0.
    h_rows = (split * num_tokens + tokens) * h_width + h_col0
    tl.store(h_ptr + h_rows[:, None] + cols[None, :], acc, mask=valid[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["num_tokens", "splits", "h_col0"])
def _expand_kernel(
    h_ptr,
    b0_ptr,
    b1_ptr,
    b2_ptr,
    y_ptr,
    sorted_ptr,
    block_slot_ptr,
    block_row_ptr,
    block_rows_ptr,
    num_tokens,
    splits,
    h_width,
    h_col0,
    stride_y,
    width0,
    width1,
    width2,
    PIECES: tl.constexpr,
    RANK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr,
):
    block = tl.program_id(0)
    col_block = tl.program_id(1)
    rows = tl.load(block_rows_ptr + block)
    if rows == 0:
        return
    slot = tl.load(block_slot_ptr + block)
    # Which piece this column block falls in: blocks never straddle two pieces.
    blocks0 = tl.cdiv(width0, BLOCK_N)
    blocks1 = tl.cdiv(width1, BLOCK_N)
    # Run-time values from the start (not constants), so that the branches can reassign them.
    piece = col_block * 0
    b_ptr = b0_ptr
    width = width0 + piece
    y_col0 = piece
    local_block = col_block
    if PIECES > 1:  # noqa: SIM102 - a compile-time branch around a run-time one
        if col_block >= blocks0:
            piece = 1
            b_ptr = b1_ptr
            width = width1
            y_col0 = width0
            local_block = col_block - blocks0
    if PIECES > 2:  # noqa: SIM102 - a compile-time branch around a run-time one
        if col_block >= blocks0 + blocks1:
            piece = 2
            b_ptr = b2_ptr
            width = width2
            y_col0 = width0 + width1
            local_block = col_block - blocks0 - blocks1
    tokens, valid = _block_tokens(sorted_ptr, block_row_ptr, block, rows, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < RANK
    h_cols = h_col0 + piece * RANK + ranks
    h = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for split in range(0, splits):
        h += tl.load(
            h_ptr + ((split * num_tokens + tokens) * h_width)[:, None] + h_cols[None, :],
            mask=valid[:, None] & rank_ok[None, :],
            other=0.0,
        )
    cols = local_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width
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
    y_ptrs = y_ptr + tokens[:, None] * stride_y + y_col0 + cols[None, :]
    mask = valid[:, None] & col_ok[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)


# Enough programs to fill an H100/H200's 132 SMs: the shrink's reduction is cut into ranges
# when a step has few token blocks, but never into ranges shorter than four K tiles.
_TARGET_PROGRAMS = 128
_MAX_SPLITS = 16
# Tile widths from bench/lora_kernels.py --sweep on an H200: 128 beat 64 (and 32) at every
# step size, for the shrink's reduction and the expand's output columns alike.
_BLOCK_K = 128
_BLOCK_N = 128
_MAX_SHRINK_COLUMNS = 256


def _splits(num_blocks: int, in_features: int) -> int:
    splits = max(1, min(_MAX_SPLITS, _TARGET_PROGRAMS // max(1, num_blocks)))
    return max(1, min(splits, triton.cdiv(in_features, 4 * _BLOCK_K)))


def lora_shrink(x: torch.Tensor, lora_a_all: torch.Tensor, groups: TokenGroups) -> torch.Tensor:
    """``h [splits, T, pieces * rank]`` fp32: each token's ``A x`` under its own slot, every
    piece side by side, as partial sums over ``splits`` ranges of the input features (the
    expand adds them). Rows of base tokens are left unwritten. ``lora_a_all`` is
    ``[pieces, slots, rank, in]``."""
    pieces, num_slots, rank, in_features = lora_a_all.shape
    num_tokens = x.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    splits = _splits(triton.cdiv(num_tokens, groups.block_m), in_features)
    k_per_split = triton.cdiv(triton.cdiv(in_features, splits), _BLOCK_K) * _BLOCK_K
    splits = triton.cdiv(in_features, k_per_split)
    h = torch.empty(splits, num_tokens, pieces * rank, dtype=torch.float32, device=x.device)
    # Pieces per launch: as many as fit one tile of _MAX_SHRINK_COLUMNS (all of them at the
    # ranks adapters have in practice).
    per_launch = max(1, min(pieces, _MAX_SHRINK_COLUMNS // triton.next_power_of_2(rank)))
    for first in range(0, pieces, per_launch):
        count = min(per_launch, pieces - first)
        _shrink_kernel[(groups.block_rows.shape[0], splits)](
            x,
            lora_a_all[first],
            h,
            groups.sorted_tokens,
            groups.block_slot,
            groups.block_row,
            groups.block_rows,
            num_tokens,
            in_features,
            x.stride(0),
            k_per_split,
            pieces * rank,
            first * rank,
            NUM_SLOTS=num_slots,
            PIECES=count,
            RANK=rank,
            BLOCK_M=groups.block_m,
            BLOCK_K=_BLOCK_K,
            BLOCK_R=max(16, triton.next_power_of_2(count * rank)),
            IEEE=x.dtype == torch.float32,
        )
    return h


def lora_expand(
    h: torch.Tensor,
    first_piece: int,
    lora_b: list[torch.Tensor],
    groups: TokenGroups,
    y: torch.Tensor,
) -> None:
    """``y[t, columns of piece p] += h[:, t, piece first_piece + p].sum(0) B_p[slot(t)]`` in
    place for every token with an adapter, one to three pieces in one launch; each
    ``lora_b`` is ``[slots, rank, out_p]`` (B transposed, scale folded in), the pieces'
    columns side by side in ``y``."""
    splits, num_tokens, h_width = h.shape
    pieces = len(lora_b)
    assert 1 <= pieces <= 3, "the expand kernel takes one to three pieces"
    assert y.stride(1) == 1, "LoRA expand writes rows of a row-major output"
    rank = lora_b[0].shape[1]
    widths = [b.shape[2] for b in lora_b] + [0] * (3 - pieces)
    padded = list(lora_b) + [lora_b[0]] * (3 - pieces)
    col_blocks = sum(triton.cdiv(w, _BLOCK_N) for w in widths)
    grid = (groups.block_rows.shape[0], col_blocks)
    _expand_kernel[grid](
        h,
        padded[0],
        padded[1],
        padded[2],
        y,
        groups.sorted_tokens,
        groups.block_slot,
        groups.block_row,
        groups.block_rows,
        num_tokens,
        splits,
        h_width,
        first_piece * rank,
        y.stride(0),
        widths[0],
        widths[1],
        widths[2],
        PIECES=pieces,
        RANK=rank,
        BLOCK_M=groups.block_m,
        BLOCK_N=_BLOCK_N,
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
    groups: TokenGroups | None = None,
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
        lora_expand(h, first, chunk, groups, y[:, offset : offset + width])
        offset += width
    return y
