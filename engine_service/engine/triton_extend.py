"""Paged extend attention: one Triton kernel for decodes, chunks over cached prefixes, prompts
and token trees, reading K/V in place through the block table.

It implements the contract of :mod:`engine_service.layers.paged_attention` (ragged batch,
block-major cache, causal / sliding-window / custom masking); the caller has already written
this step's K/V into the cache. Nothing is gathered, GQA heads are not repeated and no mask is
materialized except the caller's own ``custom_mask``.

Work split. One program per (query tile, KV head, sequence). A query tile is ``BLOCK_M``
consecutive query tokens of one sequence; its rows are those tokens times the ``GROUP`` query
heads that share the KV head, so one ``tl.dot`` serves the whole group (GQA without repeats)::

    rows of a program (GROUP_PAD = next power of two >= GROUP)
    row r  ->  query token  q_start + tile * BLOCK_M + r // GROUP_PAD
               query head   kv_head * GROUP + r % GROUP_PAD     (r % GROUP_PAD >= GROUP: padding)

Key tiles of ``BLOCK_N`` cache indices are loaded through the block table (a tile spans
``BLOCK_N / block_size`` pages). For a query tile with rows ``j0 .. j1-1`` (cache indices
``c + j``) and positions ``p_min .. p_max``, the key range splits into::

    cache index   0 ..... lo ........ full_lo ............ full_hi .......... hi
                  |skipped| masked    | unmasked (no mask  | masked (causal    |
                  (window)| (window   | work at all)       | diagonal, tree,   |
                          | edge)     |                    | sequence end)     |

    lo      = p_min - window + 1          (0 without a window)
    full_lo = p_max - window + 1          (0 without a window)
    full_hi = c + j0 + 1                  (c with a custom mask: the tree decides the rest)
    hi      = c + j1                      (seq_len with a custom mask)

Tiles outside ``[lo, hi)`` are never loaded; tiles wholly inside ``[full_lo, full_hi)`` skip
the mask. Softmax is online (running max and sum, as in FlashAttention), in fp32 with
``exp2``; fp32 inputs use IEEE-precision dots (no TF32), bf16/fp16 inputs tensor-core dots.

Attention sinks (gpt-oss) are one more logit per query head with a zero value: a program
starts its running softmax at the sink (max = sink, sum = 1) instead of empty, and adds nothing
to the accumulator. A ``HAS_SINKS`` constexpr compiles this in only for models that have
sinks; under key splits only split 0 starts from the sink, so the merge counts it once.

Decode is the ``q_i = 1`` case with a small query tile (16 rows: the group, padded). When the
grid is smaller than the GPU (few sequences, long contexts), each query tile's key tiles are
split across up to 16 programs whose partial results a second small kernel merges by their
log-sum-exp (flash-decoding). The split count comes from host-side sizes (``num_seqs``,
``max_query_len``, ``max_seq_len``) and is correct for any lengths, so a captured CUDA graph
stays valid when they change.

Measured on an H200 (``bench/extend_kernel.py``, bf16, Llama-1B/8B shapes and a GQA group of
8; ``docs/benchmarks.md``): the separate decode kernel of
:mod:`engine_service.engine.attention.triton_decode` is slower than this kernel in every decode case
(1.1x slower for 64 windowed decodes, 1.3x for 64 at 2048 tokens, up to 10x for one sequence
at 8192 thanks to the splits), so decodes need no kernel of their own. Batch-1 decode of a
long context still reads K/V at only 0.1-0.6 TB/s (against 3.2-3.9 TB/s for batches of 16
to 256): the next thing to improve.

Rows of ``q`` past ``query_start_loc[B]`` (graph padding) are left unwritten. The grid is
sized from the host-side ``max_query_len``: a captured CUDA graph serves later steps whose
query runs are no longer than at capture.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from engine_service.layers.paged_attention import AttentionMetadata

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_key_tile(
    acc,
    row_max,
    row_sum,
    q,
    k_ptr,
    v_ptr,
    tables_ptr,
    mask_ptr,
    start,
    seq,
    kv_head,
    context_len,
    seq_len,
    query_len,
    mask_offset,
    row_query,
    row_pos,
    qk_scale,
    window,
    stride_table,
    stride_k_block,
    stride_k_tok,
    stride_k_head,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    MASKED: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    CUSTOM_MASK: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Folds the keys ``start .. start+BLOCK_N-1`` into the running softmax of the rows."""
    key_idx = start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM_PAD)
    if MASKED:
        # Only this kind of tile can run past the sequence's end, where the block table holds
        # anything: keep those addresses out of the loads.
        in_seq = key_idx < seq_len
        block = tl.load(
            tables_ptr + seq * stride_table + key_idx // BLOCK_SIZE, mask=in_seq, other=0
        )
    else:
        block = tl.load(tables_ptr + seq * stride_table + key_idx // BLOCK_SIZE)
    tok_offset = (
        block.to(tl.int64) * stride_k_block
        + (key_idx % BLOCK_SIZE) * stride_k_tok
        + kv_head * stride_k_head
    )
    kv_offsets = tok_offset[:, None] + dims[None, :]
    if MASKED:
        load_mask = in_seq[:, None] & (dims < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=load_mask, other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=load_mask, other=0.0)
    elif HEAD_DIM_PAD != HEAD_DIM:
        load_mask = (tl.arange(0, BLOCK_N) >= 0)[:, None] & (dims < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=load_mask, other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=load_mask, other=0.0)
    else:
        k = tl.load(k_ptr + kv_offsets)
        v = tl.load(v_ptr + kv_offsets)

    if IEEE:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))
    scores = scores * qk_scale

    if MASKED:
        fresh = key_idx - context_len  # index among this step's keys; < 0 for cached ones
        if CUSTOM_MASK:
            in_tree = (
                (fresh[None, :] >= 0)
                & (fresh[None, :] < query_len)
                & (row_query[:, None] < query_len)
            )
            tree = tl.load(
                mask_ptr + mask_offset + row_query[:, None] * query_len + fresh[None, :],
                mask=in_tree,
                other=0,
            )
            visible = (fresh[None, :] < 0) | (tree != 0)
        else:
            visible = fresh[None, :] <= row_query[:, None]
        visible = visible & in_seq[None, :]
        if USE_WINDOW:
            visible = visible & (key_idx[None, :].to(tl.int64) > row_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))

    # Running max starts at a finite floor so that a row with nothing visible yet keeps
    # exp2(-inf - floor) = 0 instead of NaN.
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    correction = tl.exp2(row_max - new_max)
    probs = tl.exp2(scores - new_max[:, None])
    row_sum = row_sum * correction + tl.sum(probs, 1)
    acc = acc * correction[:, None]
    if IEEE:
        acc = tl.dot(probs, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(probs.to(v.dtype), v, acc)
    return acc, new_max, row_sum


# Integers that change from step to step are not specialized (Triton would compile a variant
# for values equal to 1 or divisible by 16), so warm_up's launches cover every variant a
# serving step can pick and no step stalls on a mid-run compile.
@triton.jit(do_not_specialize=["window", "num_query_tiles", "num_tokens"])
def _paged_extend_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    partial_ptr,
    lse_ptr,
    query_start_ptr,
    seq_lens_ptr,
    tables_ptr,
    positions_ptr,
    mask_ptr,
    mask_offsets_ptr,
    sinks_ptr,
    qk_scale,
    window,
    num_query_tiles,
    num_tokens,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_table,
    stride_k_block,
    stride_k_tok,
    stride_k_head,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    CUSTOM_MASK: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    IEEE: tl.constexpr,
):
    # The last query tiles see the most keys: start them first.
    tile = num_query_tiles - 1 - tl.program_id(0) // NUM_SPLITS
    split = tl.program_id(0) % NUM_SPLITS
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)

    query_start = tl.load(query_start_ptr + seq)
    query_len = tl.load(query_start_ptr + seq + 1) - query_start
    first_query = tile * BLOCK_M
    if first_query >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len
    last_query = tl.minimum(first_query + BLOCK_M, query_len)  # exclusive

    rows = tl.arange(0, BLOCK_M * GROUP_PAD)
    row_query = first_query + rows // GROUP_PAD
    row_head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (row_query < query_len) & (rows % GROUP_PAD < GROUP)
    row_token = (query_start + row_query).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM_PAD)
    io_mask = row_ok[:, None]
    if HEAD_DIM_PAD != HEAD_DIM:
        io_mask = io_mask & (dims < HEAD_DIM)[None, :]
    q = tl.load(
        q_ptr
        + row_token[:, None] * stride_q_tok
        + row_head[:, None] * stride_q_head
        + dims[None, :],
        mask=io_mask,
        other=0.0,
    )

    row_pos = tl.zeros([BLOCK_M * GROUP_PAD], tl.int64)
    lo = 0
    full_lo = 0
    if USE_WINDOW:
        row_pos = tl.load(positions_ptr + row_token, mask=row_ok, other=0)
        lo = tl.maximum(tl.min(tl.where(row_ok, row_pos, 2**62)) - window + 1, 0).to(tl.int32)
        full_lo = tl.maximum(tl.max(tl.where(row_ok, row_pos, -1)) - window + 1, 0).to(tl.int32)
    mask_offset = 0
    if CUSTOM_MASK:
        mask_offset = tl.load(mask_offsets_ptr + seq).to(tl.int64)
        full_hi = context_len
        hi = seq_len
    else:
        full_hi = context_len + first_query + 1
        hi = context_len + last_query

    # Key tiles: [lo_tile, full_lo_tile) and [full_hi_tile, hi_tile) masked, the rest not.
    lo_tile = lo // BLOCK_N
    hi_tile = tl.cdiv(hi, BLOCK_N)
    full_lo_tile = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N), lo_tile), hi_tile)
    full_hi_tile = tl.minimum(tl.maximum(full_hi // BLOCK_N, full_lo_tile), hi_tile)
    if NUM_SPLITS > 1:
        # This program's share of the key tiles; the three ranges are clipped to it.
        per_split = tl.cdiv(hi_tile - lo_tile, NUM_SPLITS)
        split_lo = lo_tile + split * per_split
        split_hi = tl.minimum(split_lo + per_split, hi_tile)
        lo_tile = tl.maximum(lo_tile, split_lo)
        full_lo_tile = tl.minimum(tl.maximum(full_lo_tile, split_lo), split_hi)
        full_hi_tile = tl.minimum(tl.maximum(full_hi_tile, split_lo), split_hi)
        hi_tile = tl.minimum(hi_tile, split_hi)

    row_max = tl.full([BLOCK_M * GROUP_PAD], -1.0e30, tl.float32)
    row_sum = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
    if HAS_SINKS:
        # The sink is one more key with a zero value: it starts the running softmax (max at
        # the sink, sum exp2(0) = 1) and adds nothing to acc. Only split 0 counts it, so the
        # combine's log-sum-exp merge sees it exactly once.
        sink = tl.load(sinks_ptr + row_head, mask=row_ok, other=-float("inf")).to(tl.float32)
        sink = tl.where(split == 0, sink * 1.4426950408889634, -float("inf"))  # to log2 units
        row_max = tl.maximum(row_max, sink)
        row_sum = tl.exp2(sink - row_max)
    acc = tl.zeros([BLOCK_M * GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    for key_tile in range(full_lo_tile, full_hi_tile):
        acc, row_max, row_sum = _attend_key_tile(
            acc, row_max, row_sum, q, k_ptr, v_ptr, tables_ptr, mask_ptr,
            key_tile * BLOCK_N, seq, kv_head, context_len, seq_len, query_len, mask_offset,
            row_query, row_pos, qk_scale, window,
            stride_table, stride_k_block, stride_k_tok, stride_k_head,
            BLOCK_N, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, False, USE_WINDOW, CUSTOM_MASK, IEEE,
        )  # fmt: skip
    for key_tile in range(lo_tile, full_lo_tile):
        acc, row_max, row_sum = _attend_key_tile(
            acc, row_max, row_sum, q, k_ptr, v_ptr, tables_ptr, mask_ptr,
            key_tile * BLOCK_N, seq, kv_head, context_len, seq_len, query_len, mask_offset,
            row_query, row_pos, qk_scale, window,
            stride_table, stride_k_block, stride_k_tok, stride_k_head,
            BLOCK_N, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, True, USE_WINDOW, CUSTOM_MASK, IEEE,
        )  # fmt: skip
    for key_tile in range(full_hi_tile, hi_tile):
        acc, row_max, row_sum = _attend_key_tile(
            acc, row_max, row_sum, q, k_ptr, v_ptr, tables_ptr, mask_ptr,
            key_tile * BLOCK_N, seq, kv_head, context_len, seq_len, query_len, mask_offset,
            row_query, row_pos, qk_scale, window,
            stride_table, stride_k_block, stride_k_tok, stride_k_head,
            BLOCK_N, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, True, USE_WINDOW, CUSTOM_MASK, IEEE,
        )  # fmt: skip

    out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    if NUM_SPLITS > 1:
        # Partial result and its log2-sum-exp2 (-inf for a split with no visible key), in
        # fp32 at [split, token, head]; _combine_splits_kernel merges them.
        lse = tl.where(row_sum > 0, row_max + tl.log2(row_sum), float("-inf"))
        num_heads = tl.num_programs(1) * GROUP
        row_slot = (split * num_tokens + row_token) * num_heads + row_head
        tl.store(lse_ptr + row_slot, lse, mask=row_ok)
        tl.store(
            partial_ptr + row_slot[:, None] * HEAD_DIM_PAD + dims[None, :],
            out,
            mask=row_ok[:, None],
        )
        return
    tl.store(
        out_ptr
        + row_token[:, None] * stride_o_tok
        + row_head[:, None] * stride_o_head
        + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=io_mask,
    )


@triton.jit(do_not_specialize=["num_rows"])
def _combine_splits_kernel(
    partial_ptr,
    lse_ptr,
    out_ptr,
    num_rows,
    stride_o_tok,
    stride_o_head,
    num_heads,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    """out[t, h] = sum over splits of partial * 2^(lse - max lse), normalized."""
    row = tl.program_id(0).to(tl.int64)  # token * num_heads + head
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM_PAD)
    lse = tl.load(lse_ptr + splits * num_rows + row)
    weight = tl.exp2(lse - tl.max(lse, 0))
    weight = tl.where(lse == float("-inf"), 0.0, weight)
    partial = tl.load(
        partial_ptr + (splits[:, None] * num_rows + row) * HEAD_DIM_PAD + dims[None, :]
    )
    out = tl.sum(partial * weight[:, None], 0) / tl.maximum(tl.sum(weight, 0), 1e-30)
    token = row // num_heads
    head = row % num_heads
    tl.store(
        out_ptr + token * stride_o_tok + head * stride_o_head + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


@dataclass(frozen=True, slots=True)
class ExtendConfig:
    """Tile shape and launch parameters: ``rows`` = query tokens x padded GQA group per
    program (16 .. 128, a power of two), ``block_n`` keys per step (16 or more), and
    ``num_splits`` programs sharing one query tile's keys (a power of two; None: chosen from
    the batch so that short batches of long contexts fill the GPU, flash-decoding style)."""

    rows: int
    block_n: int
    num_warps: int
    num_stages: int
    num_splits: int | None = None


def pick_config(
    max_query_len: int,
    group_pad: int,
    head_dim_pad: int,
    dtype: torch.dtype,
    custom_mask: bool = False,
) -> ExtendConfig:
    """The launch shape for a batch whose longest query run is ``max_query_len``.

    Picked from a sweep on an H200 (``bench/extend_kernel.py --sweep``, bf16, head dims 64
    and 128): 64-row tiles with 4 warps were fastest for prompts, chunks and mixed steps, and
    within 15% of the best for decodes; decode-only steps take 16 rows and 128-key steps.
    A tree mask costs a pointer per [rows, block_n] element, so it gets 8 warps (no spills)."""
    wanted = max(16, triton.next_power_of_2(max_query_len) * group_pad)
    if dtype == torch.float32:
        # Correctness path (IEEE dots): small tiles keep fp32 operands in registers.
        return ExtendConfig(rows=min(wanted, 32), block_n=32, num_warps=4, num_stages=2)
    if wanted <= 16:  # decode-like: memory-bound, long key steps
        return ExtendConfig(
            rows=16, block_n=128 if head_dim_pad <= 128 else 64, num_warps=4, num_stages=3
        )
    rows = min(wanted, 64)
    if custom_mask or head_dim_pad > 128:
        return ExtendConfig(rows=rows, block_n=64, num_warps=8, num_stages=3)
    return ExtendConfig(rows=rows, block_n=64, num_warps=4, num_stages=3)


def paged_extend_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
    config: ExtendConfig | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of a ragged batch over the paged cache: ``q`` ``[T, q_heads, head_dim]`` to
    ``[T, q_heads, head_dim]`` in ``q``'s dtype, under the masking and sink rules of
    :mod:`engine_service.layers.paged_attention` (``window`` None: no sliding window;
    ``sinks`` ``[q_heads]``: each head's sink logit joins its softmax with a zero value).

    Reads ``meta.query_start_loc``, ``seq_lens``, ``block_tables``, ``positions`` (only with a
    window), ``custom_mask`` and ``custom_mask_offsets`` (when a mask is given) and
    ``max_query_len``; this step's K/V must already be in ``kv_cache[:, layer]``. ``config``
    overrides the tile shape (benchmarks); by default :func:`pick_config` chooses it.
    """
    if kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
        raise ValueError(
            "kv_cache must be [num_blocks, num_layers, 2, block_size, kv_heads, head_dim], "
            f"got {tuple(kv_cache.shape)}"
        )
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[3], kv_cache.shape[4]
    if kv_cache.shape[5] != head_dim or num_heads % num_kv_heads:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit a cache of {num_kv_heads} KV heads x {kv_cache.shape[5]}"
        )
    if q.dtype != kv_cache.dtype:
        raise ValueError(f"q is {q.dtype} but the cache is {kv_cache.dtype}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    if sinks is not None and tuple(sinks.shape) != (num_heads,):
        raise ValueError(
            f"sinks must be one logit per query head ({num_heads}), got {tuple(sinks.shape)}"
        )
    if q.stride(2) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    if meta.num_seqs == 0 or num_tokens == 0:
        return out

    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    config = config or pick_config(
        meta.max_query_len, group_pad, head_dim_pad, q.dtype, meta.custom_mask is not None
    )
    if config.rows < group_pad or config.rows % group_pad or config.block_n < 16:
        raise ValueError(f"{config} does not fit a GQA group of {group}")
    block_m = config.rows // group_pad
    num_query_tiles = triton.cdiv(max(meta.max_query_len, 1), block_m)
    num_splits = config.num_splits or _auto_splits(
        num_query_tiles * num_kv_heads * meta.num_seqs, meta.max_seq_len, config.block_n, q.device
    )
    if num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    if num_splits > 1:
        partial = torch.empty(
            num_splits, num_tokens, num_heads, head_dim_pad, dtype=torch.float32, device=q.device
        )
        lse = torch.empty(num_splits, num_tokens, num_heads, dtype=torch.float32, device=q.device)
    else:
        partial = lse = out  # unused

    keys = kv_cache[:, layer, 0]
    values = kv_cache[:, layer, 1]
    custom = meta.custom_mask is not None
    if custom and meta.custom_mask_offsets is None:
        raise ValueError("custom_mask needs custom_mask_offsets")
    mask = meta.custom_mask.view(torch.uint8) if custom else meta.seq_lens  # any pointer
    mask_offsets = meta.custom_mask_offsets if custom else meta.seq_lens
    tables = meta.block_tables
    grid = (num_query_tiles * num_splits, num_kv_heads, meta.num_seqs)
    _paged_extend_kernel[grid](
        q,
        keys,
        values,
        out,
        partial,
        lse,
        meta.query_start_loc,
        meta.seq_lens,
        tables,
        meta.positions,
        mask,
        mask_offsets,
        sinks.contiguous() if sinks is not None else meta.seq_lens,  # any pointer without
        scale * _LOG2E,
        window or 0,
        num_query_tiles,
        num_tokens,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        tables.stride(0),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        GROUP=group,
        GROUP_PAD=group_pad,
        NUM_SPLITS=num_splits,
        BLOCK_M=block_m,
        BLOCK_N=config.block_n,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        USE_WINDOW=window is not None,
        CUSTOM_MASK=custom,
        HAS_SINKS=sinks is not None,
        IEEE=q.dtype == torch.float32,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_tokens * num_heads,)](
            partial,
            lse,
            out,
            num_tokens * num_heads,
            out.stride(0),
            out.stride(1),
            num_heads,
            NUM_SPLITS=num_splits,
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
        )
    return out


# A split should stream at least this many keys, or its fixed costs (q load, partial write,
# the combine) outweigh the parallelism it buys.
_MIN_KEYS_PER_SPLIT = 512
_MAX_SPLITS = 16


def _auto_splits(programs: int, max_seq_len: int, block_n: int, device: torch.device) -> int:
    """Splits that bring a small grid to about two programs per SM (1 off CUDA)."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    splits = min(triton.cdiv(2 * sms, programs), max_seq_len // _MIN_KEYS_PER_SPLIT, _MAX_SPLITS)
    return 1 if splits < 2 else 1 << (splits.bit_length() - 1)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def warm_up(
    kv_cache: torch.Tensor,
    num_heads: int,
    windows: set[int | None],
    max_query_len: int,
    sinks: bool = False,
    custom_masks: bool = False,
) -> int:
    """Compile every kernel variant a step can pick (tile shapes by query length, key
    splits, with and without a window) on a dummy one-sequence batch, so that no serving step
    stalls on Triton's JIT; ``sinks``: the model's layers pass sink logits, so the variants
    with sinks are the ones compiled; ``custom_masks``: steps may carry token trees
    (speculative verification), so the custom-mask variants are compiled too. Reads block 0
    of the cache and writes nothing to it. Returns the number of launches."""
    device = kv_cache.device
    block_size, num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4], kv_cache.shape[5]
    group_pad = triton.next_power_of_2(num_heads // num_kv_heads)
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    launches = 0
    # One query length per distinct tile shape pick_config can return.
    configs: dict[tuple[ExtendConfig, bool], int] = {}
    for custom in (False, True) if custom_masks else (False,):
        query_len = 1
        while query_len <= max(1, max_query_len):
            cfg = pick_config(query_len, group_pad, head_dim_pad, kv_cache.dtype, custom)
            configs.setdefault((cfg, custom), query_len)
            query_len *= 2
    use_window = {w is not None for w in windows}
    for (cfg, custom), query_len in configs.items():
        seq_len = query_len + block_size
        int32 = dict(dtype=torch.int32, device=device)
        meta = AttentionMetadata(
            num_tokens=query_len,
            num_seqs=1,
            max_query_len=query_len,
            max_seq_len=seq_len,
            query_start_loc=torch.tensor([0, query_len], **int32),
            seq_lens=torch.tensor([seq_len], **int32),
            positions=torch.arange(block_size, seq_len, device=device),
            slot_mapping=torch.zeros(query_len, dtype=torch.int64, device=device),
            block_tables=torch.zeros(1, -(-seq_len // block_size), **int32),
            query_start_loc_host=torch.tensor([0, query_len], dtype=torch.int32),
            seq_lens_host=torch.tensor([seq_len], dtype=torch.int32),
        )
        if custom:  # the causal triangle, given as a mask
            meta.custom_mask = (
                torch.ones(query_len, query_len, dtype=torch.bool, device=device).tril().flatten()
            )
            meta.custom_mask_offsets = torch.zeros(1, **int32)
        q = torch.zeros(query_len, num_heads, head_dim, dtype=kv_cache.dtype, device=device)
        sink_logits = torch.zeros(num_heads, dtype=kv_cache.dtype, device=device) if sinks else None
        splits = 1
        while splits <= _MAX_SPLITS:
            for windowed in use_window:
                window = block_size if windowed else None
                paged_extend_attention(
                    q, kv_cache, 0, meta, 1.0, window, replace(cfg, num_splits=splits), sink_logits
                )
                launches += 1
            splits *= 2
    return launches
