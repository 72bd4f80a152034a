"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases) and, on the
sparse layers, routed experts plus a shared expert scaled by its own sigmoid gate.
``decoder_sparse_step`` and ``mlp_only_layers`` leave some layers dense."""

from __future__ import annotations

from typing import Any

from engine_service.models.config import ModelConfig
from engine_service.models.sparse_moe import SparseCausalLM, qwen_moe_config


class Qwen2MoeForCausalLM(SparseCausalLM):
    architecture = "Qwen2MoeForCausalLM"

    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ModelConfig:
        config = ModelConfig.from_hf(raw, cls.architecture)
        config.qkv_bias, config.o_bias = bool(raw.get("qkv_bias", True)), False
        if raw.get("use_sliding_window") and raw.get("layer_types") is None:
            # Qwen2-MoE's own default: every other layer below max_window_layers.
            first_full = raw.get("max_window_layers", config.num_layers)
            raw = {
                **raw,
                "layer_types": [
                    "sliding_attention" if (i + 1) % 2 and i < first_full else "full_attention"
                    for i in range(config.num_layers)
                ],
            }
        config.set_windows_from_layer_types(raw)
        config.moe = qwen_moe_config(raw, config, shared_expert=True)
        return config
