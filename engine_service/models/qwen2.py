"""Qwen2 and Qwen2.5: biases on the q/k/v projections (none on o_proj, whatever the config
says), and sliding windows on the layers that ``layer_types`` (or ``max_window_layers``) name."""

from __future__ import annotations

from typing import Any

from engine_service.models.config import ModelConfig
from engine_service.models.dense import DenseCausalLM


class Qwen2ForCausalLM(DenseCausalLM):
    architecture = "Qwen2ForCausalLM"

    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ModelConfig:
        config = ModelConfig.from_hf(raw, cls.architecture)
        config.qkv_bias, config.o_bias = True, False
        config.set_windows_from_layer_types(raw)
        return config
