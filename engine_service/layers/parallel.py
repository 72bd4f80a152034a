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
    """This rank's place in the tensor-parallel group (``group=None``: the default group).

    ``expert_parallel``: the MoE layers hold whole experts, a share of them per rank of
    the expert-parallel group, instead of a slice of every expert (vLLM's
    ``--enable-expert-parallel``; see :mod:`engine_service.layers.expert_parallel`). Other
    layers ignore it.

    ``dp_rank`` / ``dp_size``: this tensor-parallel group's place among the engine's
    data-parallel ranks (data-parallel attention: each holds its own batch). The
    expert-parallel group spans all ``dp_size x size`` ranks, ``ep_group`` (``None``: the
    default group); rank ``dp_rank * size + rank`` of it.
    """

    rank: int = 0
    size: int = 1
    group: Any = None
    expert_parallel: bool = False
    dp_rank: int = 0
    dp_size: int = 1
    ep_group: Any = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} of size {self.size} is invalid")
        if self.dp_size < 1 or not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"data-parallel rank {self.dp_rank} of size {self.dp_size} is invalid")

    @property
    def ep_rank(self) -> int:
        """This rank's place in the expert-parallel group (data-parallel x tensor-parallel)."""
        return self.dp_rank * self.size + self.rank

    @property
    def ep_size(self) -> int:
        return self.dp_size * self.size

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

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """The group's first rank's ``x`` on every rank, in place (each passes a tensor of
        the same shape and dtype): inputs that only the first rank holds."""
        if self.size > 1:
            first = 0 if self.group is None else dist.get_global_rank(self.group, 0)
            dist.broadcast(x, src=first, group=self.group)
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's ``x`` side by side along the last dimension, on the group's first
        rank only (``None`` elsewhere): logits go to the rank that samples."""
        if self.size == 1:
            return x
        x = x.contiguous()
        first = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        pieces = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, pieces, dst=first, group=self.group)
        return torch.cat(pieces, dim=-1) if pieces is not None else None


SINGLE = TensorParallel()


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator / denominator`` when it divides exactly, else a clear error naming ``what``."""
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) is not divisible by tensor-parallel size {denominator}"
        )
    return numerator // denominator


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """Key/value heads each rank holds (and caches): an even share, or one replicated head
    when there are fewer heads than ranks (see ``QKVParallelLinear``)."""
    return num_kv_heads // tp_size if num_kv_heads >= tp_size else 1


def kv_shard(num_kv_heads: int, tp_rank: int, tp_size: int) -> tuple[int, bool]:
    """Which slice of the key/value heads rank ``tp_rank`` caches, and whether it is the
    first rank caching that slice. With fewer heads than ranks a head is replicated on
    ``tp_size / num_kv_heads`` ranks (``QKVParallelLinear``), and a latent cache (one
    "head") is whole on every rank: those ranks hold equal bytes, and one of them is enough
    to store them."""
    if num_kv_heads >= tp_size:
        return tp_rank, True
    replicas = tp_size // num_kv_heads
    return tp_rank // replicas, tp_rank % replicas == 0
