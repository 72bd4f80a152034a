"""The sparse feed-forward block that Mixtral, Qwen2-MoE, Qwen3-MoE and gpt-oss share.

A router (a replicated linear, ``gate``) scores the experts per token, :class:`FusedMoE`
(``experts``) runs each token's top-k of them, and, for Qwen2-MoE, an always-on
``shared_expert`` is added, scaled by ``sigmoid(shared_expert_gate(x))``. Module names follow
Qwen's checkpoints; a family whose checkpoint names them otherwise maps the names in its
weight mapping (:func:`moe_weight_mapping`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from engine_service.layers.linear import ReplicatedLinear
from engine_service.layers.mlp import GatedMLP
from engine_service.layers.moe import FusedMoE, expert_weight_mapping
from engine_service.layers.paged_attention import AttentionBackend
from engine_service.layers.parallel import SINGLE, TensorParallel
from engine_service.models.causal_lm import WeightMapping
from engine_service.models.config import ModelConfig, MoEConfig
from engine_service.models.dense import STACKED_WEIGHT_MAPPING, DenseCausalLM


class SparseMoeBlock(nn.Module):
    """Router, routed experts and the optional gated shared expert of one layer."""

    def __init__(
        self,
        config: ModelConfig,
        tp: TensorParallel,
        *,
        router_bias: bool = False,
        expert_bias: bool = False,
        expert_act: str | None = None,
    ) -> None:
        super().__init__()
        moe = config.moe
        if moe is None:
            raise ValueError("a sparse layer needs the model's MoE configuration")
        self.gate = ReplicatedLinear(config.hidden_size, moe.num_experts, router_bias)
        self.experts = FusedMoE(
            moe.num_experts,
            moe.top_k,
            config.hidden_size,
            moe.intermediate_size,
            renormalize=moe.renormalize,
            hidden_act=expert_act or config.hidden_act,
            tp=tp,
            bias=expert_bias,
        )
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: ReplicatedLinear | None = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(
                config.hidden_size, moe.shared_expert_intermediate_size, config.hidden_act, tp=tp
            )
            if moe.shared_expert_gate:
                self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out


def moe_weight_mapping(
    num_experts: int,
    gate: str,
    up: str,
    down: str,
    block: str = "mlp",
    router: str = "gate",
) -> dict[str, tuple[str, Any]]:
    """Mapping entries for a checkpoint whose sparse block is named ``block`` (our ``mlp``),
    its router ``router`` (our ``gate``) and its experts' projections ``gate``/``up``/``down``.

    They must come before the dense ``gate_proj``/``up_proj`` entries of a weight mapping:
    the first entry whose segment a tensor name contains wins."""
    mapping = expert_weight_mapping(num_experts, gate, up, down, f"{block}.experts", "mlp.experts")
    if (block, router) != ("mlp", "gate"):
        mapping[f"{block}.{router}"] = ("mlp.gate", None)
    return mapping


class SparseCausalLM(DenseCausalLM):
    """A dense decoder whose sparse layers (``config.moe.sparse_layers``) route to experts.

    A family names its checkpoint's expert projections (``expert_projections``: gate, up,
    down), sparse block (``block_name``) and router (``router_name``)."""

    expert_projections: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    block_name: ClassVar[str] = "mlp"
    router_name: ClassVar[str] = "gate"

    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, tp: TensorParallel = SINGLE
    ) -> None:
        super().__init__(config, backend, tp)
        # Per instance: the entries depend on the number of experts. Experts' entries first.
        self.packed_modules_mapping = {**self.expert_mapping(config), **STACKED_WEIGHT_MAPPING}

    def expert_mapping(self, config: ModelConfig) -> WeightMapping:
        gate, up, down = self.expert_projections
        return moe_weight_mapping(
            config.moe.num_experts, gate, up, down, self.block_name, self.router_name
        )

    def make_mlp(self, config: ModelConfig, layer: int, tp: TensorParallel) -> nn.Module | None:
        if config.moe is None or not config.moe.sparse_layers[layer]:
            return None
        return SparseMoeBlock(config, tp)


def qwen_moe_config(raw: dict[str, Any], config: ModelConfig, shared_expert: bool) -> MoEConfig:
    """Qwen MoE's fields: ``num_experts``, ``moe_intermediate_size``, ``norm_topk_prob``;
    layer ``i`` is sparse unless listed in ``mlp_only_layers`` or ``(i + 1)`` is not a
    multiple of ``decoder_sparse_step``."""
    num_experts = raw.get("num_experts") or raw.get("num_local_experts") or 0
    step = raw.get("decoder_sparse_step", 1) or 1
    dense_only = set(raw.get("mlp_only_layers") or [])
    return MoEConfig(
        num_experts=num_experts,
        top_k=raw["num_experts_per_tok"],
        intermediate_size=raw["moe_intermediate_size"],
        renormalize=bool(raw.get("norm_topk_prob", False)),
        sparse_layers=[
            num_experts > 0 and i not in dense_only and (i + 1) % step == 0
            for i in range(config.num_layers)
        ],
        shared_expert_intermediate_size=(
            raw.get("shared_expert_intermediate_size", 0) if shared_expert else 0
        ),
        shared_expert_gate=shared_expert,
    )
