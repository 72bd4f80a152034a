"""The CUDA backend: Triton kernels that read K/V in place through the block tables.

Steps made only of decodes run the paged decode kernel (one program per sequence and KV
head); every other step runs the paged extend kernel, which takes queries of any length per
sequence and an optional token-tree mask. Both take their shapes from static buffers, so
the whole forward pass can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine_service.engine.attention.sdpa import SdpaBackend, write_kv
from engine_service.engine.attention.triton_decode import paged_decode_attention
from engine_service.layers.paged_attention import AttentionMetadata

try:
    from engine_service.engine.triton_extend import paged_extend_attention
except ImportError:  # pragma: no cover - the extend kernel is optional
    paged_extend_attention = None


@dataclass(slots=True)
class _TritonPlan:
    decode_only: bool


class TritonBackend(SdpaBackend):
    name = "triton"
    supports_custom_mask = True
    supports_cuda_graphs = True
    supports_mixed_graphs = paged_extend_attention is not None

    def prepare(self, meta: AttentionMetadata, block_size: int) -> None:
        decode_only = meta.max_query_len == 1 and meta.custom_mask is None
        if not decode_only and paged_extend_attention is None:
            super().prepare(meta, block_size)  # the SDPA path for extends
            return
        meta.backend_data = _TritonPlan(decode_only)

    def prepare_for_capture(self, meta: AttentionMetadata, block_size: int) -> None:
        meta.backend_data = _TritonPlan(meta.max_query_len == 1 and meta.custom_mask is None)

    def forward(self, q, k, v, kv_cache, layer, meta, scale, window):
        plan = meta.backend_data
        if not isinstance(plan, _TritonPlan):
            return super().forward(q, k, v, kv_cache, layer, meta, scale, window)
        write_kv(kv_cache, layer, k, v, meta.slot_mapping)
        if plan.decode_only:
            return paged_decode_attention(
                q,
                kv_cache[:, layer, 0],
                kv_cache[:, layer, 1],
                meta.block_tables,
                meta.seq_lens,
                scale,
                window,
            )
        return paged_extend_attention(q, kv_cache, layer, meta, scale, window)
