"""Attention over the paged KV cache, behind one interface with swappable backends.

The batch is flat: ``T`` query tokens from ``B`` sequences laid end to end. The KV cache is
one tensor per engine, laid out block-major so that a block's keys and values for every layer
are one contiguous run (what offload and hand-off copy)::

    kv_cache[num_blocks, num_layers, 2 (k, v), block_size, num_kv_heads, head_dim]

Token ``t`` of the batch writes its K/V to ``kv_cache[slot_block[t], layer, :, slot_offset[t]]``
and a sequence reads its first ``seq_len`` positions through its block table.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(slots=True)
class PrefillSlice:
    """A sequence computing more than one token this step (a prompt or a chunk of one)."""

    query_start: int
    query_end: int
    start_pos: int
    seq_len: int
    block_ids: torch.Tensor


@dataclass(slots=True)
class AttentionMetadata:
    """Where each token's K/V goes and what each query may attend to, built once a step."""

    slot_block: torch.Tensor
    slot_offset: torch.Tensor
    # Sequences computing exactly one token (decodes), batched together.
    decode_rows: torch.Tensor
    decode_block_tables: torch.Tensor
    decode_seq_lens: torch.Tensor
    num_decodes: int
    prefills: list[PrefillSlice]
    # Masks depend on a layer's sliding window; built once per distinct window.
    _decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def decode_mask(self, block_size: int, window: int | None) -> torch.Tensor:
        mask = self._decode_masks.get(window)
        if mask is None:
            width = self.decode_block_tables.shape[1] * block_size
            key_pos = torch.arange(width, device=self.decode_seq_lens.device)
            seq_lens = self.decode_seq_lens[:, None]
            mask = key_pos[None, :] < seq_lens
            if window is not None:
                mask &= key_pos[None, :] > seq_lens - 1 - window
            mask = mask[:, None, None, :]
            self._decode_masks[window] = mask
        return mask


class AttentionBackend(abc.ABC):
    """Computes attention for one layer of a flat batch and stores the new K/V.

    Contract: ``forward`` first writes ``k``/``v`` (``[T, kv_heads, head_dim]``) into the
    layer's cache slots, then returns ``[T, q_heads, head_dim]``, where query ``i`` of a
    sequence at position ``p`` attends to that sequence's keys at positions ``<= p`` (and
    ``> p - window`` for a sliding-window layer).
    """

    @abc.abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        layer: int,
        meta: AttentionMetadata,
        scale: float,
        window: int | None,
    ) -> torch.Tensor: ...


class SdpaBackend(AttentionBackend):
    """The reference backend on ``torch.nn.functional.scaled_dot_product_attention``.

    It runs anywhere torch runs. Decodes go through one padded batched call; each prefill
    chunk is its own call, reading earlier context through its block table.
    """

    def _decode(self, q, key_cache, value_cache, meta: AttentionMetadata, scale, window):
        """Attention of the one-token sequences: ``[num_decodes, q_heads, head_dim]``."""
        block_size = key_cache.shape[1]
        tables = meta.decode_block_tables
        num, width = tables.shape[0], tables.shape[1] * block_size
        keys = key_cache[tables].reshape(num, width, *key_cache.shape[2:]).transpose(1, 2)
        values = value_cache[tables].reshape(num, width, *value_cache.shape[2:]).transpose(1, 2)
        attn = F.scaled_dot_product_attention(
            q[meta.decode_rows].unsqueeze(2),
            keys,
            values,
            attn_mask=meta.decode_mask(block_size, window),
            scale=scale,
            enable_gqa=True,
        )
        return attn.squeeze(2)

    def forward(self, q, k, v, kv_cache, layer, meta, scale, window):
        key_cache = kv_cache[:, layer, 0]
        value_cache = kv_cache[:, layer, 1]
        key_cache[meta.slot_block, meta.slot_offset] = k
        value_cache[meta.slot_block, meta.slot_offset] = v
        out = torch.empty_like(q)

        if meta.num_decodes:
            out[meta.decode_rows] = self._decode(q, key_cache, value_cache, meta, scale, window)

        for chunk in meta.prefills:
            rows = slice(chunk.query_start, chunk.query_end)
            query = q[rows].transpose(0, 1).unsqueeze(0)
            num_q = chunk.query_end - chunk.query_start
            if chunk.start_pos == 0 and window is None:
                # The whole context is in this step: attend to the fresh K/V directly.
                keys = k[rows].transpose(0, 1).unsqueeze(0)
                values = v[rows].transpose(0, 1).unsqueeze(0)
                attn = _prefill_sdpa(query, keys, values, None, scale)
            else:
                keys = key_cache[chunk.block_ids].flatten(0, 1)[: chunk.seq_len]
                values = value_cache[chunk.block_ids].flatten(0, 1)[: chunk.seq_len]
                keys = keys.transpose(0, 1).unsqueeze(0)
                values = values.transpose(0, 1).unsqueeze(0)
                q_pos = torch.arange(chunk.start_pos, chunk.start_pos + num_q, device=q.device)
                k_pos = torch.arange(chunk.seq_len, device=q.device)
                mask = k_pos[None, :] <= q_pos[:, None]
                if window is not None:
                    mask &= k_pos[None, :] > q_pos[:, None] - window
                attn = _prefill_sdpa(query, keys, values, mask, scale)
            out[rows] = attn.squeeze(0).transpose(0, 1)
        return out


# cuDNN attention builds a plan for every new sequence length (tens of milliseconds each),
# which prompts of ever-changing lengths keep paying; flash and memory-efficient need none.
_CUDA_PREFILL_KERNELS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def _prefill_sdpa(query, keys, values, mask, scale):
    """Causal (``mask`` None) or masked attention of one prefill chunk.

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


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto`` is the Triton backend on a CUDA device with Triton installed, else SDPA."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_available() else "sdpa"
    if name == "sdpa":
        return SdpaBackend()
    if name == "triton":
        if device.type != "cuda":
            raise ValueError("the triton attention backend needs a CUDA device")
        from engine_service.engine.triton_attention import TritonBackend

        return TritonBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose auto, sdpa or triton")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
