"""Random ragged batches over a paged cache, and the dense attention they must produce.

Shared by ``test_extend_kernel.py`` (CPU, Triton's interpreter) and the CUDA check and
benchmark in ``bench/``. The reference gathers each sequence's keys, builds the dense mask
from the rules of :mod:`engine_service.layers.paged_attention` and calls SDPA in fp32: it is
the specification the paged kernel is held to.

The batches are built to catch addressing mistakes: blocks are handed out in random order,
every cache slot that no sequence owns (spare blocks, the tail of a last block) holds NaN,
unused block-table columns name a spare (NaN) block, and the cache has two layers with
different contents. A kernel that reads one key too many returns NaN rather than crashing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine_service.layers.paged_attention import AttentionMetadata


@dataclass(frozen=True, slots=True)
class SequenceSpec:
    """One sequence of a step: ``context_len`` tokens already cached, ``query_len`` new ones,
    laid out as a chain (causal) or, with ``tree``, as a random token tree."""

    context_len: int
    query_len: int
    tree: bool = False


@dataclass(slots=True)
class ExtendCase:
    q: torch.Tensor
    kv_cache: torch.Tensor
    layer: int
    meta: AttentionMetadata


def random_parents(rng: random.Random, size: int) -> list[int]:
    """A random token tree in topological order: node 0 is the root, ``parent[j] < j``."""
    return [-1] + [rng.randrange(j) for j in range(1, size)]


def tree_mask(parents: list[int]) -> torch.Tensor:
    """``mask[j, k]``: ``k`` is ``j`` or one of its ancestors."""
    size = len(parents)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for j in range(size):
        node = j
        while node >= 0:
            mask[j, node] = True
            node = parents[node]
    return mask


def mixed_specs(
    rng: random.Random, num_seqs: int, max_context: int, max_query: int, trees: bool = False
) -> list[SequenceSpec]:
    """Decodes, chunks over cached prefixes and prompts from position 0 in one batch, plus
    (with ``trees``) token trees over cached prefixes."""
    kinds = ["decode", "chunk", "prompt"] + (["tree"] if trees else [])
    specs = []
    for i in range(num_seqs):
        kind = kinds[i % len(kinds)]
        if kind == "decode":
            specs.append(SequenceSpec(rng.randrange(1, max_context + 1), 1))
        elif kind == "chunk":
            specs.append(
                SequenceSpec(rng.randrange(1, max_context + 1), rng.randrange(2, max_query + 1))
            )
        elif kind == "prompt":
            specs.append(SequenceSpec(0, rng.randrange(1, max_query + 1)))
        else:
            specs.append(
                SequenceSpec(
                    rng.randrange(0, max_context + 1), rng.randrange(2, max_query + 1), tree=True
                )
            )
    rng.shuffle(specs)
    return specs


def build_case(
    specs: list[SequenceSpec],
    *,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    seed: int = 0,
    custom_mask: bool | None = None,
    spare_blocks: int = 2,
) -> ExtendCase:
    """A step of ``specs`` with random q and cache contents, built on ``device``;
    ``custom_mask`` None means "only when some sequence is a tree" (True forces one for plain
    sequences too)."""
    if spare_blocks < 1:
        raise ValueError("the unused table columns need a spare block")
    device = torch.device(device)
    rng = random.Random(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    seq_lens = [s.context_len + s.query_len for s in specs]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    order = list(range(num_blocks))
    rng.shuffle(order)
    width = max(blocks_per_seq) + 2
    # Spare blocks stay NaN; unused table columns point at one of them.
    tables = torch.full((len(specs), width), order[-1], dtype=torch.int32)
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    taken = 0
    for i, n in enumerate(seq_lens):
        ids = order[taken : taken + blocks_per_seq[i]]
        taken += blocks_per_seq[i]
        tables[i, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        idx = torch.arange(n)
        owned[tables[i, idx // block_size].long(), idx % block_size] = True
    num_layers, layer = 2, 1
    shape = (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
    cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    cache.masked_fill_(~owned.to(device)[:, None, None, :, None, None], float("nan"))

    positions, masks, mask_offsets = [], [], []
    mask_start = 0
    use_mask = any(s.tree for s in specs) if custom_mask is None else custom_mask
    for spec in specs:
        if spec.tree:
            parents = random_parents(rng, spec.query_len)
            mask = tree_mask(parents)
            depth = mask.sum(1) - 1
            positions.append(spec.context_len + depth)
        else:
            mask = torch.ones(spec.query_len, spec.query_len, dtype=torch.bool).tril()
            positions.append(torch.arange(spec.context_len, spec.context_len + spec.query_len))
        masks.append(mask.flatten())
        mask_offsets.append(mask_start)
        mask_start += spec.query_len**2

    query_lens = torch.tensor([s.query_len for s in specs])
    query_start = torch.zeros(len(specs) + 1, dtype=torch.int32)
    query_start[1:] = query_lens.cumsum(0)
    num_tokens = int(query_start[-1])
    num_heads = num_kv_heads * group
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen, device=device, dtype=dtype)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    meta = AttentionMetadata(
        num_tokens=num_tokens,
        num_seqs=len(specs),
        max_query_len=int(query_lens.max()),
        max_seq_len=max(seq_lens),
        query_start_loc=query_start.to(device),
        seq_lens=seq_lens_t.to(device),
        positions=torch.cat(positions).long().to(device),
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        block_tables=tables.to(device),
        query_start_loc_host=query_start,
        seq_lens_host=seq_lens_t,
        custom_mask=torch.cat(masks).to(device) if use_mask else None,
        custom_mask_offsets=torch.tensor(mask_offsets, dtype=torch.int32, device=device)
        if use_mask
        else None,
    )
    return ExtendCase(
        q=q.to(device, dtype), kv_cache=cache.to(device, dtype), layer=layer, meta=meta
    )


def dense_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 attention of every sequence over its gathered keys under a dense mask built from
    the contract's rules; returned in ``q``'s dtype. ``sinks`` (``[q_heads]``): each head's
    softmax gets one more column, its sink logit, whose value is zero."""
    out = torch.empty_like(q)
    block_size = kv_cache.shape[3]
    group = q.shape[1] // kv_cache.shape[4]
    query_start = meta.query_start_loc.tolist()
    for i, seq_len in enumerate(meta.seq_lens.tolist()):
        start, end = query_start[i], query_start[i + 1]
        query_len = end - start
        if query_len == 0:  # a padding sequence of a captured graph
            continue
        context_len = seq_len - query_len
        idx = torch.arange(seq_len, device=q.device)
        blocks = meta.block_tables[i, idx // block_size].long()
        keys = kv_cache[blocks, layer, 0, idx % block_size].float()  # [seq_len, kv_heads, D]
        values = kv_cache[blocks, layer, 1, idx % block_size].float()
        if meta.custom_mask is not None:
            offset = int(meta.custom_mask_offsets[i])
            fresh = meta.custom_mask[offset : offset + query_len * query_len].view(
                query_len, query_len
            )
        else:
            fresh = torch.ones(query_len, query_len, dtype=torch.bool, device=q.device).tril()
        cached = torch.ones(query_len, context_len, dtype=torch.bool, device=q.device)
        visible = torch.cat([cached, fresh], dim=1)
        if window is not None:
            visible &= idx[None, :] > meta.positions[start:end, None] - window
        query = q[start:end].float().transpose(0, 1)  # [heads, q, D]
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)
        if sinks is None:
            attn = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=visible, scale=scale
            )
        else:
            scores = (query @ keys.transpose(1, 2)) * scale
            scores = scores.masked_fill(~visible, float("-inf"))
            sink_column = sinks.float()[:, None, None].expand(-1, query_len, 1)
            probs = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1)
            attn = probs[..., :-1] @ values
        out[start:end] = attn.transpose(0, 1).to(q.dtype)
    return out
