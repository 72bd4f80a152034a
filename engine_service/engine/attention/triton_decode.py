"""The paged decode kernel: one query token per sequence reads K/V straight from the paged
cache, one program per (sequence, KV head), with no gather and no padding to the longest
context. The GQA group of query heads shares each K/V load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    seq_lens_ptr,
    out_ptr,
    scale,
    window,
    stride_q_tok,
    stride_q_head,
    stride_k_block,
    stride_k_tok,
    stride_k_head,
    stride_table,
    stride_o_tok,
    stride_o_head,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    heads = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    offsets = tl.arange(0, BLOCK_SIZE)
    head_ok = heads < GROUP
    q_heads = kv_head * GROUP + heads
    q = tl.load(
        q_ptr + seq * stride_q_tok + q_heads[:, None] * stride_q_head + dims[None, :],
        mask=head_ok[:, None],
        other=0.0,
    )
    seq_len = tl.load(seq_lens_ptr + seq)
    first = 0
    if USE_WINDOW:
        first = tl.maximum(seq_len - window, 0)

    # Online softmax over the blocks (FlashAttention's running max and sum).
    running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for block_index in range(first // BLOCK_SIZE, tl.cdiv(seq_len, BLOCK_SIZE)):
        block = tl.load(tables_ptr + seq * stride_table + block_index).to(tl.int64)
        base = block * stride_k_block + kv_head * stride_k_head
        kv_offsets = base + offsets[:, None] * stride_k_tok + dims[None, :]
        k = tl.load(k_ptr + kv_offsets)
        v = tl.load(v_ptr + kv_offsets)
        if IEEE:  # fp32 caches: full precision, not TF32
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        positions = block_index * BLOCK_SIZE + offsets
        valid = (positions < seq_len) & (positions >= first)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        block_max = tl.maximum(running_max, tl.max(scores, 1))
        correction = tl.exp(running_max - block_max)
        probs = tl.exp(scores - block_max[:, None])
        running_sum = running_sum * correction + tl.sum(probs, 1)
        if IEEE:
            acc = acc * correction[:, None] + tl.dot(probs, v, input_precision="ieee")
        else:
            acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v).to(tl.float32)
        running_max = block_max
    out = acc / running_sum[:, None]
    tl.store(
        out_ptr + seq * stride_o_tok + q_heads[:, None] * stride_o_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=head_ok[:, None],
    )


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """``q``: ``[B, q_heads, D]``; caches: ``[blocks, block_size, kv_heads, D]`` views."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        q,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        out,
        scale,
        window or 0,
        q.stride(0),
        q.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        USE_WINDOW=window is not None,
        IEEE=q.dtype == torch.float32,
    )
    return out
