"""Qwen3 (dense): a per-head RMSNorm on queries and keys before rotary, an explicit
``head_dim`` (not hidden / heads), tied embeddings in the small sizes, optional windows."""

from __future__ import annotations

from typing import Any

from engine_service.models.config import ModelConfig
from engine_service.models.dense import DenseCausalLM


class Qwen3ForCausalLM(DenseCausalLM):
    architecture = "Qwen3ForCausalLM"
    qk_norm = True

    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ModelConfig:
        config = ModelConfig.from_hf(raw, cls.architecture)
        config.set_windows_from_layer_types(raw)
        return config
