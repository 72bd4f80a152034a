"""Linear layers that load their own weights, shard them across tensor-parallel ranks, and
carry an optional LoRA delta.

Every parameter has a ``weight_loader(param, loaded, shard_id)`` that copies the checkpoint
tensor ``loaded`` (the full, unsharded tensor) into this rank's part of ``param``. Stacked
projections name their pieces by shard id, so the loader never concatenates anything::

    QKVParallelLinear (tp size 2, rank r)    weight rows on rank r
      checkpoint q_proj [H*d, in]  ──shard "q"──▶ [0, Hl*d)            rows r*Hl*d ...
      checkpoint k_proj [K*d, in]  ──shard "k"──▶ [Hl*d, Hl*d+Kl*d)    rows of kv head group
      checkpoint v_proj [K*d, in]  ──shard "v"──▶ [Hl*d+Kl*d, ...)     same group as "k"

Column-parallel layers split the output features (each rank computes its slice; gathered
only when ``gather_output``); row-parallel layers split the input features (each rank holds a
partial sum, rank 0 adding the bias; all-reduced). A LoRA delta is applied to the
rank-local result before any collective, which is exact for both: the column case is
sliced like the weight, the row case sums like the weight.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from engine_service.layers.parallel import SINGLE, TensorParallel, divide

if TYPE_CHECKING:
    from engine_service.layers.lora import LoRADelta

ShardId = Any  # None (whole tensor), an int (merged piece), "q"/"k"/"v", (expert, piece)


def default_weight_loader(
    param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None
) -> None:
    """Copy a whole, replicated tensor (norms, embeddings)."""
    if shard_id is not None:
        raise ValueError(f"a replicated parameter has no shard {shard_id!r}")
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} != ours {tuple(param.shape)}")
    param.data.copy_(loaded)


def _parameter(shape: Sequence[int], loader: Any, shard_ids: tuple = (None,)) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = loader
    # The loader checks that every declared piece of a stacked parameter arrived.
    param.shard_ids = shard_ids
    return param


@dataclass(frozen=True, slots=True)
class OutputShard:
    """Where one checkpoint piece lands: rows ``[offset, offset + size)`` of our parameter,
    taken from rows ``[source_start, source_start + size)`` of a ``source_size``-row tensor."""

    offset: int
    size: int
    source_start: int
    source_size: int


class LinearBase(nn.Module, abc.ABC):
    """``y = x W^T (+ b)`` with a weight loader per parameter and a LoRA hook.

    ``lora``, when set, adds its delta to the local result of :meth:`local_forward`.
    """

    def __init__(self, input_size: int, output_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.input_size = input_size  # rank-local
        self.output_size = output_size  # rank-local
        self.tp = tp
        self.lora: LoRADelta | None = None

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's result before any collective (bias included only where exact)."""
        y = F.linear(x, self.weight, self._local_bias())
        if self.lora is not None:
            self.lora.add_delta(x, y)
        return y

    def _local_bias(self) -> torch.Tensor | None:
        return self.bias

    @abc.abstractmethod
    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None
    ) -> None:
        """Copy this rank's part of the full checkpoint tensor ``loaded`` into ``param``."""

    @abc.abstractmethod
    def lora_output_slices(self) -> list[tuple[ShardId, int]]:
        """The output pieces (shard id, local width) that each get their own LoRA pair."""

    @abc.abstractmethod
    def lora_full_sizes(self, shard_id: ShardId = None) -> tuple[int, int]:
        """(in, out_piece): the unsharded features of one output piece's LoRA pair, as a
        PEFT checkpoint holds it (``A [r, in]``, ``B [out_piece, r]``)."""

    @abc.abstractmethod
    def shard_lora(
        self, lora_a: torch.Tensor, lora_b: torch.Tensor, shard_id: ShardId = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of a full LoRA pair ``A [r, in]``, ``B [out_piece, r]``."""


class ColumnParallelLinear(LinearBase):
    """Splits output features across ranks; ``output_sizes`` lists stacked pieces (full
    sizes), each split separately so that every rank holds a slice of every piece."""

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int] | int,
        bias: bool = False,
        tp: TensorParallel = SINGLE,
        gather_output: bool = False,
        shards: dict[ShardId, OutputShard] | None = None,
    ) -> None:
        if shards is None:
            sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
            shard_ids: list[ShardId] = (
                [None] if isinstance(output_sizes, int) else list(range(len(sizes)))
            )
            shards, offset = {}, 0
            for shard_id, full in zip(shard_ids, sizes):
                local = divide(full, tp.size, "output features")
                shards[shard_id] = OutputShard(offset, local, tp.rank * local, full)
                offset += local
        local_out = sum(s.size for s in shards.values())
        super().__init__(input_size, local_out, tp)
        self.shards = shards
        self.gather_output = gather_output
        ids = tuple(shards)
        self.weight = _parameter((local_out, input_size), self.weight_loader, ids)
        self.bias = _parameter((local_out,), self.weight_loader, ids) if bias else None

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None
    ) -> None:
        if shard_id not in self.shards:
            raise ValueError(f"unknown shard {shard_id!r}; this layer has {list(self.shards)}")
        shard = self.shards[shard_id]
        if loaded.shape[0] != shard.source_size or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"checkpoint shape {tuple(loaded.shape)} does not fit shard {shard_id!r} "
                f"({shard.source_size} rows of {tuple(param.shape[1:])})"
            )
        piece = loaded.narrow(0, shard.source_start, shard.size)
        param.data.narrow(0, shard.offset, shard.size).copy_(piece)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local_forward(x)
        return self.tp.all_gather(y) if self.gather_output else y

    def lora_output_slices(self) -> list[tuple[ShardId, int]]:
        return [(shard_id, shard.size) for shard_id, shard in self.shards.items()]

    def lora_full_sizes(self, shard_id: ShardId = None) -> tuple[int, int]:
        return self.input_size, self.shards[shard_id].source_size

    def shard_lora(self, lora_a, lora_b, shard_id=None):
        # A whole on every rank; B's rows sliced as the base weight's rows of this piece.
        shard = self.shards[shard_id]
        return lora_a, lora_b.narrow(0, shard.source_start, shard.size)


class ReplicatedLinear(ColumnParallelLinear):
    """The whole matrix on every rank (heads, routers)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(input_size, output_size, bias, SINGLE)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several projections of one input stacked into one matrix (gate and up); the
    checkpoint's pieces load by index: shard 0, 1, ..."""

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool = False,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__(input_size, list(output_sizes), bias, tp)


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matrix, shards ``"q"``, ``"k"``, ``"v"``.

    Query heads split evenly across ranks. Key/value heads split too when there are at least
    as many as ranks; otherwise each is replicated on ``size / num_kv_heads`` ranks.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp: TensorParallel = SINGLE,
    ) -> None:
        self.num_heads = divide(num_heads, tp.size, "attention heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads = divide(num_kv_heads, tp.size, "key/value heads")
            kv_head = tp.rank * self.num_kv_heads
        else:
            replicas = divide(tp.size, num_kv_heads, "tensor-parallel size over key/value heads")
            self.num_kv_heads = 1
            kv_head = tp.rank // replicas
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        shards = {
            "q": OutputShard(0, q, tp.rank * q, num_heads * head_dim),
            "k": OutputShard(q, kv, kv_head * head_dim, num_kv_heads * head_dim),
            "v": OutputShard(q + kv, kv, kv_head * head_dim, num_kv_heads * head_dim),
        }
        super().__init__(hidden_size, q + 2 * kv, bias, tp, shards=shards)


class RowParallelLinear(LinearBase):
    """Splits input features across ranks; partial sums are all-reduced when
    ``reduce_results`` (else the caller reduces). Rank 0 alone adds the bias, so the ranks'
    local results sum to the unsharded one."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp: TensorParallel = SINGLE,
        reduce_results: bool = True,
    ) -> None:
        super().__init__(divide(input_size, tp.size, "input features"), output_size, tp)
        self.full_input_size = input_size
        self.reduce_results = reduce_results
        self.weight = _parameter((output_size, self.input_size), self.weight_loader)
        self.bias = _parameter((output_size,), default_weight_loader) if bias else None

    def _local_bias(self) -> torch.Tensor | None:
        return self.bias if self.tp.rank == 0 else None

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"a row-parallel weight has no shard {shard_id!r}")
        if tuple(loaded.shape) != (self.output_size, self.full_input_size):
            raise ValueError(
                f"checkpoint shape {tuple(loaded.shape)} != {(self.output_size, self.full_input_size)}"
            )
        param.data.copy_(loaded.narrow(1, self.tp.rank * self.input_size, self.input_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local_forward(x)
        return self.tp.all_reduce(y) if self.reduce_results else y

    def lora_output_slices(self) -> list[tuple[ShardId, int]]:
        return [(None, self.output_size)]

    def lora_full_sizes(self, shard_id: ShardId = None) -> tuple[int, int]:
        return self.full_input_size, self.output_size

    def shard_lora(self, lora_a, lora_b, shard_id=None):
        # A's columns sliced as the base weight's; B whole. Each rank's delta
        # (x_r A_r^T) B^T is then a partial sum like its base result, and the one
        # all-reduce that sums those sums the deltas too: B (sum_r x_r A_r^T) = sum_r B(...).
        return lora_a.narrow(1, self.tp.rank * self.input_size, self.input_size), lora_b
