"""Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm, explicit ``head_dim``) and routed
experts without a shared one; ``norm_topk_prob`` renormalises the chosen weights."""

from __future__ import annotations

from typing import Any

from engine_service.models.config import ModelConfig
from engine_service.models.sparse_moe import SparseCausalLM, qwen_moe_config


class Qwen3MoeForCausalLM(SparseCausalLM):
    architecture = "Qwen3MoeForCausalLM"
    qk_norm = True

    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ModelConfig:
        config = ModelConfig.from_hf(raw, cls.architecture)
        if raw.get("use_sliding_window") and raw.get("sliding_window"):
            # Qwen3-MoE's window, when on, applies to every layer.
            config.sliding_windows = [raw["sliding_window"]] * config.num_layers
        config.moe = qwen_moe_config(raw, config, shared_expert=False)
        return config
