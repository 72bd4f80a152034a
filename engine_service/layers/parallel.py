"""Tensor parallelism as the layers see it: which shard this rank holds, and the collectives.

A layer built with ``TensorParallel(rank, size, group)`` holds its ``1/size`` share of a
weight and combines partial results through ``torch.distributed`` on ``group``. With
``size == 1`` (the default) no collective runs and no process group is needed, so the same
layers serve one device and many.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class TensorParallel:
    """This rank's place in the tensor-parallel group (``group=None``: the default group)."""

    rank: int = 0
    size: int = 1
    group: Any = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} of size {self.size} is invalid")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group, in place (identity for one rank)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension, in rank order."""
        if self.size == 1:
            return x
        # Gathered along the first dimension (the layout every backend, gloo included,
        # supports), then the ranks' pieces laid side by side.
        x = x.contiguous()
        gathered = torch.empty(
            (self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device
        )
        dist.all_gather_single(gathered, x, group=self.group)
        return torch.cat(gathered.chunk(self.size, dim=0), dim=-1)


SINGLE = TensorParallel()


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator / denominator`` when it divides exactly, else a clear error naming ``what``."""
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) is not divisible by tensor-parallel size {denominator}"
        )
    return numerator // denominator
