"""The gated feed-forward block of Llama-family models: ``down(act(gate(x)) * up(x))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine_service.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from engine_service.layers.parallel import SINGLE, TensorParallel

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    """The activation function a checkpoint's ``hidden_act`` names."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """Gate and up projections stacked in ``gate_up_proj`` (shards 0 and 1), then
    ``down_proj``; with tensor parallelism the inner dimension is split across ranks."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str = "silu",
        bias: bool = False,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], bias, tp
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, tp)
        self.act = activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)
