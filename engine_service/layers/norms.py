"""RMS normalisation, as Llama-family checkpoints define it."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``weight * x / rms(x)`` over the last dimension.

    Normalises in fp32 and scales in the input dtype, as the reference models do, so that
    half-precision outputs round the same way as ``transformers``'. ``scale_in_fp32``: scales
    in fp32 and casts last (gpt-oss's order).
    """

    def __init__(self, size: int, eps: float, scale_in_fp32: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps
        self.scale_in_fp32 = scale_in_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.scale_in_fp32:
            return (self.weight.float() * x).to(dtype)
        return self.weight * x.to(dtype)
