"""The reference backend on ``torch.nn.functional.scaled_dot_product_attention``.

It runs anywhere torch runs and implements the whole contract (custom masks, sliding
windows, attention sinks), so it is the oracle the Triton kernels are checked against. Sequences computing
one token without a tree (decodes) go through one padded batched call; every other
sequence is its own call over its gathered context with the contract's dense mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine_service.layers.paged_attention import AttentionBackend, AttentionMetadata


def write_kv(
    kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store this step's keys and values at their slots (``block * block_size + offset``)."""
    block_size = kv_cache.shape[3]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, layer, 0, offsets] = k
    kv_cache[blocks, layer, 1, offsets] = v


def extend_mask(
    num_cached: int,
    positions: torch.Tensor,
    window: int | None,
    custom: torch.Tensor | None,
) -> torch.Tensor:
    """The contract's ``[q, num_cached + q]`` visibility mask for one sequence's queries:
    every cached key, causal (or ``custom``) among the new ones, minus what a sliding
    window hides (cache index ``<= position - window``)."""
    num_q = positions.shape[0]
    device = positions.device
    own = (
        custom
        if custom is not None
        else torch.ones(num_q, num_q, dtype=torch.bool, device=device).tril()
    )
    cached = torch.ones(num_q, num_cached, dtype=torch.bool, device=device)
    mask = torch.cat([cached, own], dim=1)
    if window is not None:
        key_index = torch.arange(num_cached + num_q, device=device)
        mask &= key_index[None, :] > positions[:, None] - window
    return mask


@dataclass(slots=True)
class _SdpaPlan:
    """Which sequences are batched decodes and which run alone, decided on the host."""

    decode_seqs: torch.Tensor | None = None  # sequence indices
    decode_rows: torch.Tensor | None = None  # their query rows
    decode_tables: torch.Tensor | None = None
    decode_lens: torch.Tensor | None = None
    # (sequence, first row, end row, context length) of every other sequence.
    extends: list[tuple[int, int, int, int]] = field(default_factory=list)
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)


def sink_scale(
    attn: torch.Tensor,
    query: torch.Tensor,
    keys: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    sinks: torch.Tensor,
) -> torch.Tensor:
    """``attn`` (SDPA's output ``[B, Hq, q, D]``, a softmax over the visible keys) as if each
    head's softmax also had the extra logit ``sinks[h]`` with a zero value: scaled by
    ``Z / (Z + exp(sink)) = sigmoid(lse - sink)``, ``lse`` the log-sum-exp of the visible
    scores. ``mask`` None: causal over ``q`` queries and as many keys."""
    group = query.shape[1] // keys.shape[1]
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)
    scores = (query.float() @ keys.float().transpose(-1, -2)) * scale
    if mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    factor = torch.sigmoid(lse - sinks.float()[None, :, None])
    return (attn.float() * factor[..., None]).to(attn.dtype)


class SdpaBackend(AttentionBackend):
    name = "sdpa"
    supports_custom_mask = True
    supports_sinks = True

    def prepare(self, meta: AttentionMetadata, block_size: int) -> None:
        starts = meta.query_start_loc_host[: meta.num_seqs + 1]
        lens = meta.seq_lens_host[: meta.num_seqs]
        q_lens = starts[1:] - starts[:-1]
        plan = _SdpaPlan()
        is_decode = (
            q_lens == 1 if meta.custom_mask is None else torch.zeros_like(q_lens, dtype=torch.bool)
        )
        for i in torch.nonzero(~is_decode & (q_lens > 0)).flatten().tolist():
            plan.extends.append((i, int(starts[i]), int(starts[i + 1]), int(lens[i])))
        decodes = torch.nonzero(is_decode).flatten()
        if len(decodes):
            device = meta.seq_lens.device
            seqs = decodes.to(device)
            width = -(-int(lens[decodes].max()) // block_size)
            plan.decode_seqs = seqs
            plan.decode_rows = meta.query_start_loc[:-1][seqs].long()
            plan.decode_tables = meta.block_tables[seqs, :width].long()
            plan.decode_lens = meta.seq_lens[seqs].long()
        meta.backend_data = plan

    def forward(self, q, k, v, kv_cache, layer, meta, scale, window, sinks=None):
        write_kv(kv_cache, layer, k, v, meta.slot_mapping)
        key_cache, value_cache = kv_cache[:, layer, 0], kv_cache[:, layer, 1]
        plan: _SdpaPlan = meta.backend_data
        out = torch.empty_like(q)
        if plan.decode_seqs is not None:
            out[plan.decode_rows] = self._decode(
                q, key_cache, value_cache, plan, scale, window, sinks
            )
        for seq, q0, q1, seq_len in plan.extends:
            out[q0:q1] = self._extend(
                q, k, v, key_cache, value_cache, meta, seq, q0, q1, seq_len, scale, window, sinks
            )
        return out

    def _decode(self, q, key_cache, value_cache, plan: _SdpaPlan, scale, window, sinks):
        """Attention of the one-token sequences: ``[num_decodes, q_heads, head_dim]``."""
        tables = plan.decode_tables
        num, width = tables.shape[0], tables.shape[1] * key_cache.shape[1]
        keys = key_cache[tables].reshape(num, width, *key_cache.shape[2:]).transpose(1, 2)
        values = value_cache[tables].reshape(num, width, *value_cache.shape[2:]).transpose(1, 2)
        mask = plan.masks.get(window)
        if mask is None:
            key_pos = torch.arange(width, device=tables.device)[None, :]
            seq_lens = plan.decode_lens[:, None]
            mask = key_pos < seq_lens
            if window is not None:
                mask &= key_pos > seq_lens - 1 - window
            mask = plan.masks[window] = mask[:, None, None, :]
        query = q[plan.decode_rows].unsqueeze(2)
        attn = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
        if sinks is not None:
            attn = sink_scale(attn, query, keys, mask, scale, sinks)
        return attn.squeeze(2)

    def _extend(
        self, q, k, v, key_cache, value_cache, meta, seq, q0, q1, seq_len, scale, window, sinks
    ):
        num_q = q1 - q0
        num_cached = seq_len - num_q
        query = q[q0:q1].transpose(0, 1).unsqueeze(0)
        custom = None
        if meta.custom_mask is not None:
            offset = int(meta.custom_mask_offsets[seq])
            custom = meta.custom_mask[offset : offset + num_q * num_q].view(num_q, num_q)
        if num_cached == 0 and window is None and custom is None:
            # The whole context is in this step: attend to the fresh K/V directly.
            keys = k[q0:q1].transpose(0, 1).unsqueeze(0)
            values = v[q0:q1].transpose(0, 1).unsqueeze(0)
            mask = None
        else:
            block_size = key_cache.shape[1]
            num_blocks = -(-seq_len // block_size)
            table = meta.block_tables[seq, :num_blocks].long()
            keys = key_cache[table].flatten(0, 1)[:seq_len].transpose(0, 1).unsqueeze(0)
            values = value_cache[table].flatten(0, 1)[:seq_len].transpose(0, 1).unsqueeze(0)
            mask = extend_mask(num_cached, meta.positions[q0:q1], window, custom)
        attn = _prefill_sdpa(query, keys, values, mask, scale)
        if sinks is not None:
            attn = sink_scale(attn, query, keys, mask, scale, sinks)
        return attn.squeeze(0).transpose(0, 1)


# cuDNN attention builds a plan for every new sequence length (tens of milliseconds each),
# which prompts of ever-changing lengths keep paying; flash and memory-efficient need none.
_CUDA_PREFILL_KERNELS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def _prefill_sdpa(query, keys, values, mask, scale):
    """Causal (``mask`` None) or masked attention of one sequence's queries.

    On CUDA the KV heads are repeated up to the query heads first, since grouped-query
    inputs would send SDPA to its slow math kernel, and cuDNN's kernel is skipped.
    """
    if not query.is_cuda:
        return F.scaled_dot_product_attention(
            query,
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
    if keys.shape[1] != query.shape[1]:
        group = query.shape[1] // keys.shape[1]
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    with sdpa_kernel(_CUDA_PREFILL_KERNELS, set_priority=True):
        return F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, is_causal=mask is None, scale=scale
        )
