"""Qwen2 and Qwen2.5: bias on the q/k/v projections (not on o_proj), optional windows."""

from __future__ import annotations

from typing import Any

from engine_service.models.config import ModelConfig
from engine_service.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ModelConfig:
        config = ModelConfig.from_hf(raw, "Qwen2ForCausalLM")
        config.qkv_bias, config.o_bias = True, False
        config.set_windows_from_layer_types(raw)
        return config
