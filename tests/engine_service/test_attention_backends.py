"""The SDPA reference backend on the ragged-batch contract: token trees and sliding windows.

A tree query must see exactly its own path: attention of node ``j`` under a tree mask equals
plain causal attention over the cached prefix followed by ``j``'s ancestors and ``j``, which
this test computes directly with softmax (no mask builder shared with the backend).
"""

from __future__ import annotations

import torch

from engine_service.engine.attention import get_attention_backend
from engine_service.layers.paged_attention import AttentionMetadata

BLOCK = 4
HEADS, KV_HEADS, DIM, LAYERS = 4, 2, 8, 2


def random_tree(gen: torch.Generator, size: int) -> list[int]:
    """A parent for every node; node 0 is the root, each node's parent comes before it."""
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, size)]


def ancestors(parents: list[int], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def build(seqs, gen):
    """seqs: (cached prefix length, tree parents or None for a causal chunk of n tokens)."""
    num_blocks = 64
    kv_cache = torch.randn(num_blocks, LAYERS, 2, BLOCK, KV_HEADS, DIM, generator=gen)
    free = list(torch.randperm(num_blocks, generator=gen).tolist())
    starts, lens, positions, slots, tables, masks, offsets = [0], [], [], [], [], [], []
    width = 0
    for cached, tree in seqs:
        n = len(tree)
        seq_len = cached + n
        table = [free.pop() for _ in range(-(-seq_len // BLOCK))]
        width = max(width, len(table))
        tables.append(table)
        depth = [len(ancestors(tree, j)) - 1 for j in range(n)]
        for j in range(n):
            idx = cached + j
            slots.append(table[idx // BLOCK] * BLOCK + idx % BLOCK)
            positions.append(cached + depth[j])
        mask = torch.zeros(n, n, dtype=torch.bool)
        for j in range(n):
            mask[j, ancestors(tree, j)] = True
        offsets.append(sum(m.numel() for m in masks))
        masks.append(mask.flatten())
        starts.append(starts[-1] + n)
        lens.append(seq_len)
    offsets.append(sum(m.numel() for m in masks))
    padded = [t + [0] * (width - len(t)) for t in tables]
    qsl = torch.tensor(starts, dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    meta = AttentionMetadata(
        num_tokens=starts[-1],
        num_seqs=len(seqs),
        max_query_len=max(len(t) for _, t in seqs),
        max_seq_len=max(lens),
        query_start_loc=qsl,
        seq_lens=seq_lens,
        positions=torch.tensor(positions),
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor(padded, dtype=torch.int32),
        query_start_loc_host=qsl,
        seq_lens_host=seq_lens,
        custom_mask=torch.cat(masks),
        custom_mask_offsets=torch.tensor(offsets),
    )
    return kv_cache, meta, tables


def path_attention(q, keys, values, scale):
    """``q`` [heads, dim] over ``keys``/``values`` [len, kv_heads, dim], GQA by repetition."""
    group = HEADS // KV_HEADS
    k = keys.repeat_interleave(group, dim=1)
    v = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,lhd->hl", q, k) * scale
    return torch.einsum("hl,lhd->hd", scores.softmax(-1), v)


def test_tree_mask_equals_attention_over_each_nodes_own_path():
    gen = torch.Generator().manual_seed(0)
    seqs = [(5, random_tree(gen, 7)), (0, random_tree(gen, 6)), (9, [-1]), (3, random_tree(gen, 9))]
    kv_cache, meta, tables = build(seqs, gen)
    q = torch.randn(meta.num_tokens, HEADS, DIM, generator=gen)
    k = torch.randn(meta.num_tokens, KV_HEADS, DIM, generator=gen)
    v = torch.randn(meta.num_tokens, KV_HEADS, DIM, generator=gen)
    backend = get_attention_backend("sdpa", torch.device("cpu"))
    layer, scale = 1, DIM**-0.5
    backend.prepare(meta, BLOCK)
    out = backend.forward(q, k, v, kv_cache, layer, meta, scale, None)

    row = 0
    for (cached, tree), table in zip(seqs, tables):
        key_cache = kv_cache[table, layer, 0].flatten(0, 1)
        value_cache = kv_cache[table, layer, 1].flatten(0, 1)
        for j in range(len(tree)):
            path = list(range(cached)) + [cached + a for a in ancestors(tree, j)]
            expected = path_attention(q[row + j], key_cache[path], value_cache[path], scale)
            torch.testing.assert_close(out[row + j], expected, rtol=1e-5, atol=1e-5)
        # The step's own keys landed in their slots.
        torch.testing.assert_close(key_cache[cached : cached + len(tree)], k[row : row + len(tree)])
        row += len(tree)


def test_sliding_window_hides_keys_by_position():
    gen = torch.Generator().manual_seed(1)
    chain = [-1, 0, 1, 2, 3]  # a causal chunk of five tokens after 11 cached ones
    kv_cache, meta, tables = build([(11, chain)], gen)
    meta.custom_mask = meta.custom_mask_offsets = None
    q = torch.randn(5, HEADS, DIM, generator=gen)
    k = torch.randn(5, KV_HEADS, DIM, generator=gen)
    v = torch.randn(5, KV_HEADS, DIM, generator=gen)
    backend = get_attention_backend("sdpa", torch.device("cpu"))
    backend.prepare(meta, BLOCK)
    window, scale = 6, DIM**-0.5
    out = backend.forward(q, k, v, kv_cache, 0, meta, scale, window)

    keys = kv_cache[tables[0], 0, 0].flatten(0, 1)
    values = kv_cache[tables[0], 0, 1].flatten(0, 1)
    for j in range(5):
        pos = 11 + j
        visible = [i for i in range(pos + 1) if i > pos - window]
        expected = path_attention(q[j], keys[visible], values[visible], scale)
        torch.testing.assert_close(out[j], expected, rtol=1e-5, atol=1e-5)
