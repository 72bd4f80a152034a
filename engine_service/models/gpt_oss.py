"""gpt-oss: attention with a learned sink logit per head, sliding-window and full layers
alternating (``layer_types``), YaRN rope, biases on every attention projection, and on every
layer a mixture of experts with biases, a biased router, softmax over the top-k logits and a
clamped SwiGLU (``swigluoai``). RMSNorm scales in fp32 before casting.

The checkpoint stores each layer's experts stacked and transposed, gate and up interleaved
along the inner dimension (``experts.gate_up_proj [E, H, 2I]``); they load into
:class:`~engine_service.layers.moe.FusedMoE`'s layout as :class:`StackedExperts` shards.
Only unquantized (bf16/fp32) checkpoints load; the MXFP4 release is refused with a clear error.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from engine_service.layers.moe import (
    SWIGLU_OAI,
    SWIGLU_OAI_ALPHA,
    SWIGLU_OAI_LIMIT,
    StackedExperts,
)
from engine_service.layers.parallel import TensorParallel
from engine_service.models.causal_lm import WeightMapping
from engine_service.models.config import ModelConfig, MoEConfig
from engine_service.models.sparse_moe import SparseCausalLM, SparseMoeBlock

GATE_UP = StackedExperts("gate_up", transposed=True, interleaved=True)
DOWN = StackedExperts("down", transposed=True)
# The shard ids FusedMoE.expect_stacked gives the biases (the layout flags carry over).
GATE_UP_BIAS = replace(GATE_UP, piece="gate_up_bias")
DOWN_BIAS = replace(DOWN, piece="down_bias")


class GptOssForCausalLM(SparseCausalLM):
    architecture = "GptOssForCausalLM"
    attention_sinks = True
    norm_in_fp32 = True

    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ModelConfig:
        quant = raw.get("quantization_config")
        if quant:
            raise ValueError(
                f"gpt-oss checkpoints quantized with {quant.get('quant_method', quant)!r} are "
                "not supported; use an unquantized (bf16) checkpoint"
            )
        alpha, limit = raw.get("swiglu_alpha", SWIGLU_OAI_ALPHA), raw.get("swiglu_limit")
        if (alpha, limit or SWIGLU_OAI_LIMIT) != (SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT):
            raise ValueError(
                f"gpt-oss expert activation with alpha {alpha} and limit {limit} is not "
                f"supported (only {SWIGLU_OAI_ALPHA} and {SWIGLU_OAI_LIMIT})"
            )
        config = ModelConfig.from_hf(raw, cls.architecture)
        config.set_windows_from_layer_types(raw)
        config.moe = MoEConfig(
            num_experts=raw["num_local_experts"],
            top_k=raw["num_experts_per_tok"],
            intermediate_size=config.intermediate_size,
            # A softmax over the top-k logits equals the top-k of the softmax renormalised.
            renormalize=True,
            sparse_layers=[True] * config.num_layers,
        )
        return config

    def expert_mapping(self, config: ModelConfig) -> WeightMapping:
        return {
            "mlp.router": ("mlp.gate", None),
            "mlp.experts.gate_up_proj_bias": ("mlp.experts.w13_bias", GATE_UP_BIAS),
            "mlp.experts.down_proj_bias": ("mlp.experts.w2_bias", DOWN_BIAS),
            "mlp.experts.gate_up_proj": ("mlp.experts.w13", GATE_UP),
            "mlp.experts.down_proj": ("mlp.experts.w2", DOWN),
        }

    def make_mlp(self, config: ModelConfig, layer: int, tp: TensorParallel) -> nn.Module:
        block = SparseMoeBlock(
            config, tp, router_bias=True, expert_bias=True, expert_act=SWIGLU_OAI
        )
        block.experts.expect_stacked(GATE_UP, DOWN)
        return block
