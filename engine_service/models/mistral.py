"""Mistral: Llama's layers with a sliding attention window on every layer."""

from __future__ import annotations

from typing import Any

from engine_service.models.config import ModelConfig
from engine_service.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ModelConfig:
        config = ModelConfig.from_hf(raw, "MistralForCausalLM")
        window = raw.get("sliding_window")
        config.sliding_windows = [window] * config.num_layers
        return config
