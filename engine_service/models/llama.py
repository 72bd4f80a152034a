"""Llama (1, 2, 3, 3.1 with llama3 rope scaling): the plain family the others adjust."""

from __future__ import annotations

from typing import Any

from engine_service.engine.attention import AttentionBackend
from engine_service.models.config import ModelConfig
from engine_service.models.layers import CausalLM


class LlamaForCausalLM(CausalLM):
    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ModelConfig:
        return ModelConfig.from_hf(raw, "LlamaForCausalLM")

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__(config, backend)
