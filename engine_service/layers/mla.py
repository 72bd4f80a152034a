"""Multi-head latent attention (DeepSeek-V2/V3) over a paged cache of compressed latents.

Each token caches one vector per layer, not K and V per head: the normalised KV latent
``c`` (``kv_lora_rank`` wide) followed by the rotated, head-shared rope key ``k_pe``
(``qk_rope_head_dim``). Per head, keys and values are linear in the latent,
``k_nope_h = W_UK[h] c`` and ``v_h = W_UV[h] c`` (the two halves of ``kv_b_proj``), so::

    kv_cache[num_blocks, num_layers, 1, block_size, 1, kv_lora_rank + qk_rope_head_dim]
                                                       └ c ─────────┘└ k_pe ──────────┘

which is the engine's block layout with one plane and one "head" (``kv_block_shape`` of the
model's config): slots, block tables, copy-on-write, offload and hand-off work unchanged.

Two ways to attend, equal in exact arithmetic:

- **absorbed** (decode): ``q_nope_h W_UK[h]`` turns each query into latent space, so scores
  are ``[q_lat_h ; q_pe_h] . [c ; k_pe]`` against the cache as it is stored (multi-query
  attention with one key of width ``kv_lora_rank + rope``), and the weighted sum of latents
  goes through ``W_UV[h]`` after attention. Nothing per head is ever materialised per token.
- **expanded** (prefill and other extends): the sequence's latents are expanded to per-head
  keys and values through ``kv_b_proj``; attention then runs as ordinary multi-head SDPA,
  cheaper when many queries share the expansion.

Masking follows :mod:`engine_service.layers.paged_attention` (cached keys all visible, causal
or the step's custom tree mask among the new ones). This torch path runs on every device;
it plans on the host once per step (:class:`MLAPlan`), so steps are not captured in graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engine_service.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from engine_service.layers.norms import RMSNorm
from engine_service.layers.paged_attention import AttentionMetadata
from engine_service.layers.parallel import SINGLE, TensorParallel, divide
from engine_service.layers.rotary import apply_rotary


@dataclass(slots=True)
class MLAPlan:
    """Which sequences decode (one query, batched) and which extend, decided on the host
    once per forward pass and shared by every layer."""

    block_size: int
    decode_rows: torch.Tensor | None = None  # query rows of the one-token sequences
    decode_tables: torch.Tensor | None = None  # [num_decodes, width] block ids
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, width * block_size]
    # (sequence, first row, end row, context length) of every other sequence.
    extends: list[tuple[int, int, int, int]] = field(default_factory=list)

    @classmethod
    def build(cls, meta: AttentionMetadata, block_size: int) -> MLAPlan:
        starts = meta.query_start_loc_host[: meta.num_seqs + 1]
        lens = meta.seq_lens_host[: meta.num_seqs]
        q_lens = starts[1:] - starts[:-1]
        if meta.custom_mask is None:
            is_decode = q_lens == 1
        else:
            is_decode = torch.zeros_like(q_lens, dtype=torch.bool)
        plan = cls(block_size)
        for i in torch.nonzero(~is_decode & (q_lens > 0)).flatten().tolist():
            plan.extends.append((i, int(starts[i]), int(starts[i + 1]), int(lens[i])))
        decodes = torch.nonzero(is_decode).flatten()
        if len(decodes):
            device = meta.seq_lens.device
            seqs = decodes.to(device)
            width = -(-int(lens[decodes].max()) // block_size)
            plan.decode_rows = meta.query_start_loc[:-1][seqs].long()
            plan.decode_tables = meta.block_tables[seqs, :width].long()
            key_pos = torch.arange(width * block_size, device=device)[None, :]
            mask = key_pos < meta.seq_lens[seqs].long()[:, None]
            plan.decode_mask = mask[:, None, None, :]
        return plan


def rope_deinterleave(x: torch.Tensor) -> torch.Tensor:
    """DeepSeek's interleaved rotary pairs ``(x0, x1), (x2, x3), ...`` laid out as halves
    ``(x0, x2, ...), (x1, x3, ...)``, where :func:`apply_rotary` rotates the same pairs. The
    same permutation of queries and keys leaves their dot products unchanged."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class MultiHeadLatentAttention(nn.Module):
    """One layer's MLA: low-rank query (``q_lora_rank``, optional) and KV projections, the
    latent cache, absorbed decode and expanded extend. With tensor parallelism each rank
    runs its share of the heads; the latent projection is replicated."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        layer: int,
        *,
        scale: float,
        rms_norm_eps: float,
        rope_interleave: bool = True,
        bias: bool = False,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.scale = scale
        self.rope_interleave = rope_interleave
        self.kv_lora_rank, self.nope, self.rope, self.v_dim = (
            kv_lora_rank,
            qk_nope_head_dim,
            qk_rope_head_dim,
            v_head_dim,
        )
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.num_heads = divide(num_heads, tp.size, "attention heads")  # rank-local
        if q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden_size, num_heads * qk_head_dim, False, tp)
        else:
            self.q_a_proj = ReplicatedLinear(hidden_size, q_lora_rank, bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, rms_norm_eps)
            self.q_b_proj = ColumnParallelLinear(q_lora_rank, num_heads * qk_head_dim, False, tp)
        self.q_lora = q_lora_rank is not None
        self.kv_a_proj_with_mqa = ReplicatedLinear(
            hidden_size, kv_lora_rank + qk_rope_head_dim, bias
        )
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, rms_norm_eps)
        self.kv_b_proj = ColumnParallelLinear(
            kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), False, tp
        )
        self.o_proj = RowParallelLinear(num_heads * v_head_dim, hidden_size, bias, tp)

    def forward(
        self,
        hidden: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        plan: MLAPlan,
    ) -> torch.Tensor:
        """``hidden [T, hidden]`` to ``[T, hidden]``; ``cos_sin`` for ``qk_rope_head_dim``."""
        num_tokens = hidden.shape[0]
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        else:
            q = self.q_proj(hidden)
        q = q.view(num_tokens, self.num_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora_rank, self.rope], -1)
        latent = self.kv_a_layernorm(latent)
        k_pe = k_pe.reshape(num_tokens, 1, self.rope)
        if self.rope_interleave:
            q_pe, k_pe = rope_deinterleave(q_pe), rope_deinterleave(k_pe)
        cos, sin = cos_sin
        q_pe, k_pe = apply_rotary(q_pe, cos, sin), apply_rotary(k_pe, cos, sin)

        # [num_blocks, block_size, kv_lora_rank + rope]: this layer's view of the cache.
        cache = kv_cache[:, self.layer, 0, :, 0]
        slots = meta.slot_mapping
        entries = torch.cat((latent, k_pe[:, 0]), dim=-1)
        cache[slots // plan.block_size, slots % plan.block_size] = entries.to(cache.dtype)

        out = hidden.new_empty(num_tokens, self.num_heads, self.v_dim)
        w_kv = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, -1)
        w_uk, w_uv = w_kv[:, : self.nope], w_kv[:, self.nope :]
        if plan.decode_rows is not None:
            out[plan.decode_rows] = self._absorbed(q_nope, q_pe, cache, plan, w_uk, w_uv)
        for seq, q0, q1, seq_len in plan.extends:
            out[q0:q1] = self._expanded(
                q_nope[q0:q1], q_pe[q0:q1], latent, k_pe, cache, meta, seq, q0, q1, seq_len
            )
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.v_dim))

    def _absorbed(self, q_nope, q_pe, cache, plan: MLAPlan, w_uk, w_uv) -> torch.Tensor:
        """Decode rows: multi-query attention over the stored latents, ``[D, heads, v]``."""
        rows = plan.decode_rows
        # q_lat[t, h] = W_UK[h]^T q_nope[t, h]: the query moved into latent space.
        q_lat = torch.einsum("thn,hnr->thr", q_nope[rows], w_uk)
        query = torch.cat((q_lat, q_pe[rows]), dim=-1).unsqueeze(2)  # [D, heads, 1, r + rope]
        tables = plan.decode_tables
        keys = cache[tables].flatten(1, 2).unsqueeze(1)  # [D, 1, width, r + rope]
        values = keys[..., : self.kv_lora_rank]
        attn = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=plan.decode_mask, scale=self.scale, enable_gqa=True
        )  # [D, heads, 1, r]
        return torch.einsum("thr,hvr->thv", attn.squeeze(2), w_uv)

    def _expanded(self, q_nope, q_pe, latent, k_pe, cache, meta, seq, q0, q1, seq_len):
        """One extending sequence: its latents expanded to per-head K/V, ``[q, heads, v]``."""
        num_q = q1 - q0
        num_cached = seq_len - num_q
        custom = None
        if meta.custom_mask is not None:
            offset = int(meta.custom_mask_offsets[seq])
            custom = meta.custom_mask[offset : offset + num_q * num_q].view(num_q, num_q)
        if num_cached == 0 and custom is None:
            # The whole context is in this step: expand the fresh latents directly.
            ctx_latent, ctx_pe, mask = latent[q0:q1], k_pe[q0:q1, 0], None
        else:
            num_blocks = -(-seq_len // cache.shape[1])
            table = meta.block_tables[seq, :num_blocks].long()
            stored = cache[table].flatten(0, 1)[:seq_len]
            ctx_latent, ctx_pe = stored.split([self.kv_lora_rank, self.rope], dim=-1)
            own = custom
            if own is None:
                own = torch.ones(num_q, num_q, dtype=torch.bool, device=q_nope.device).tril()
            seen = torch.ones(num_q, num_cached, dtype=torch.bool, device=q_nope.device)
            mask = torch.cat((seen, own), dim=1)
        kv = self.kv_b_proj(ctx_latent.to(q_nope.dtype))
        kv = kv.view(-1, self.num_heads, self.nope + self.v_dim)
        k_nope, values = kv.split([self.nope, self.v_dim], dim=-1)
        ctx_pe = ctx_pe.to(q_nope.dtype)[:, None, :].expand(-1, self.num_heads, -1)
        keys = torch.cat((k_nope, ctx_pe), dim=-1)
        query = torch.cat((q_nope, q_pe), dim=-1)
        attn = F.scaled_dot_product_attention(
            query.transpose(0, 1),
            keys.transpose(0, 1),
            values.transpose(0, 1),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
        )
        return attn.transpose(0, 1)
