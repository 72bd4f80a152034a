"""Qwen3: per-head RMSNorm on queries and keys before rotary, explicit head_dim."""

from __future__ import annotations

from typing import Any

from engine_service.models.config import ModelConfig
from engine_service.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ModelConfig:
        config = ModelConfig.from_hf(raw, "Qwen3ForCausalLM")
        config.qk_norm = True
        config.set_windows_from_layer_types(raw)
        return config
