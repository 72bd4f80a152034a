"""Mixtral: Mistral's attention (a sliding window on every layer when ``sliding_window`` is
set) with every feed-forward block a top-2-of-8 mixture of experts, renormalised weights."""

from __future__ import annotations

from typing import Any, ClassVar

from engine_service.models.config import ModelConfig, MoEConfig
from engine_service.models.sparse_moe import SparseCausalLM


class MixtralForCausalLM(SparseCausalLM):
    architecture = "MixtralForCausalLM"
    expert_projections: ClassVar[tuple[str, str, str]] = ("w1", "w3", "w2")
    block_name = "block_sparse_moe"

    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ModelConfig:
        config = ModelConfig.from_hf(raw, cls.architecture)
        config.sliding_windows = [raw.get("sliding_window")] * config.num_layers
        config.moe = MoEConfig(
            num_experts=raw["num_local_experts"],
            top_k=raw["num_experts_per_tok"],
            intermediate_size=config.intermediate_size,
            renormalize=True,
            sparse_layers=[True] * config.num_layers,
        )
        return config
