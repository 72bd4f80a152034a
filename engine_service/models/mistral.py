"""Mistral: Llama's layer shapes with a sliding attention window on every layer (when the
config sets ``sliding_window``)."""

from __future__ import annotations

from typing import Any

from engine_service.models.config import ModelConfig
from engine_service.models.dense import DenseCausalLM


class MistralForCausalLM(DenseCausalLM):
    architecture = "MistralForCausalLM"

    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ModelConfig:
        config = ModelConfig.from_hf(raw, cls.architecture)
        config.sliding_windows = [raw.get("sliding_window")] * config.num_layers
        return config
