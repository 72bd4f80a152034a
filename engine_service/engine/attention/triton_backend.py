"""The CUDA backend: one Triton kernel that reads K/V in place through the block tables.

Every step, decode-only or mixed, runs the paged extend kernel
(:mod:`engine_service.engine.triton_extend`): queries of any length per sequence, causal,
sliding-window and token-tree masks, per-head attention sinks (gpt-oss), no gather and no
repeated heads. Measured on an H200,
it beats the separate paged decode kernel (``triton_decode.py``, kept for the benchmark's
comparison) on every decode shape, so decodes take it too. It reads only device tensors whose
shapes the step's buckets fix, so whole steps capture into CUDA graphs.
"""

from __future__ import annotations

from engine_service.engine.attention.sdpa import write_kv
from engine_service.engine.triton_extend import paged_extend_attention, warm_up
from engine_service.layers.paged_attention import AttentionBackend, AttentionMetadata


class TritonBackend(AttentionBackend):
    name = "triton"
    supports_custom_mask = True
    supports_cuda_graphs = True
    supports_mixed_graphs = True
    supports_sinks = True

    def warm_up(
        self, kv_cache, num_heads, windows, max_tokens, sinks=False, custom_masks=False
    ) -> None:
        # Every tile shape and key split a step may pick, compiled before serving: a Triton
        # JIT compile in the middle of serving stalls every request in the step for seconds.
        warm_up(kv_cache, num_heads, windows, max_tokens, sinks, custom_masks)

    def forward(self, q, k, v, kv_cache, layer, meta: AttentionMetadata, scale, window, sinks=None):
        write_kv(kv_cache, layer, k, v, meta.slot_mapping)
        return paged_extend_attention(q, kv_cache, layer, meta, scale, window, sinks=sinks)
