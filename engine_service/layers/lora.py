"""LoRA deltas on linear layers: the hook every linear layer calls, and the torch reference.

A linear layer whose ``lora`` is set computes its base result ``y = x W^T`` and then calls
``lora.add_delta(x, y)``, which adds, for every token ``t`` whose adapter slot
``a = slots[t]`` is not negative, ``B_a A_a x_t`` to each output piece of ``y[t]`` (a stacked
qkv projection has three pieces, each with its own pair; ``alpha / r`` is folded into ``B``).

Which adapter each token uses is step data: the runner writes the step's per-token slots
into the model's one :class:`LoRASlots` before the forward pass, and every delta of the model
reads it there. Keeping the slots in one persistent tensor lets a CUDA graph capture the
deltas, and lets a batched kernel (punica/SGMV-style ``y += B_a(A_a(x))`` over token groups)
replace :class:`TorchLoRA` behind the same two methods.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from engine_service.layers.linear import LinearBase

NO_ADAPTER = -1
# Slots x rank up to which a step computes every slot's delta and masks (two matmuls per
# layer, no host sync) instead of grouping tokens by adapter.
DENSE_MAX_COLUMNS = 512


class LoRASlots:
    """The step's adapter slot per token (``[T]`` int64, ``-1`` for the base model), shared
    by every LoRA delta of one model. ``None`` means no token of the step uses an adapter."""

    def __init__(self) -> None:
        self.token_slots: torch.Tensor | None = None
        self._masks: dict[tuple, Any] = {}
        # Whether every delta reading these slots runs without host syncs, so that a CUDA
        # graph can capture a step's deltas with the slots in a static buffer.
        self.graph_safe = False

    def set(self, token_slots: torch.Tensor | None) -> None:
        self.token_slots = token_slots
        self._masks = {}

    def groups(self, num_slots: int) -> Any:
        """The step's tokens grouped by slot for the Triton kernels (see
        :func:`engine_service.layers.triton_lora.group_tokens`), built once per step."""
        key = ("groups", num_slots)
        groups = self._masks.get(key)
        if groups is None:
            from engine_service.layers.triton_lora import group_tokens

            assert self.token_slots is not None
            groups = self._masks[key] = group_tokens(self.token_slots, num_slots)
        return groups

    def rank_mask(self, num_slots: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
        """``[T, num_slots * rank]``: 1 in the ``rank`` columns of each token's own slot,
        0 elsewhere (all 0 for base tokens); built once per step and shape."""
        key = (num_slots, rank, dtype)
        mask = self._masks.get(key)
        if mask is None:
            assert self.token_slots is not None
            slots = self.token_slots
            own = slots.unsqueeze(1) == torch.arange(num_slots, device=slots.device)
            mask = self._masks[key] = own.to(dtype).repeat_interleave(rank, dim=1)
        return mask


class LoRADelta(abc.ABC):
    """Adds low-rank adapter deltas to one linear layer's rank-local output, in place.

    Contract: ``add_delta(x, y)`` with ``x [T, in_local]`` and ``y [T, out_local]`` leaves
    rows of tokens without an adapter untouched.
    """

    @abc.abstractmethod
    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> None: ...

    @property
    def graph_safe(self) -> bool:
        """True when :meth:`add_delta` never reads device data on the host."""
        return False


class TorchLoRA(LoRADelta):
    """The reference: adapters in fixed slots, zero-padded to ``max_rank``.

    Two ways to run a step, same result:

    - *dense* (``max_adapters * max_rank <= DENSE_MAX_COLUMNS``): every slot's shrink in one
      matmul over all output pieces, ``h = x A_all^T`` (``[T, pieces * slots * rank]``), the
      columns of other slots masked to zero, then one expand matmul per piece. More FLOPs
      than needed (every slot, not only the token's), but a handful of kernels per layer
      and no host sync, which is what small batches and CPUs are bound by;
    - *grouped*: one pair of matmuls per (adapter in use, piece) over that adapter's tokens;
      it reads the step's adapters on the host (``torch.unique``).

    Neither is for graph capture; :class:`TritonLoRA` runs the same weights through batched
    (punica/SGMV-style) kernels on CUDA.
    """

    def __init__(
        self, layer: LinearBase, slots: LoRASlots, max_adapters: int, max_rank: int
    ) -> None:
        self.layer = layer
        self.slots = slots
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.dense = max_adapters * max_rank <= DENSE_MAX_COLUMNS
        weight = layer.weight
        self.pieces = layer.lora_output_slices()
        like = dict(dtype=weight.dtype, device=weight.device)
        # A of every piece in one tensor, so that the dense path shrinks in one matmul.
        self.lora_a_all = torch.zeros(
            len(self.pieces), max_adapters, max_rank, layer.input_size, **like
        )
        self.lora_a = list(self.lora_a_all.unbind(0))  # [slots, rank, in] per piece
        # B stored transposed, [slots, rank, out_piece]: rows of (slot, rank) for the expand.
        self.lora_b = [
            torch.zeros(max_adapters, max_rank, width, **like) for _, width in self.pieces
        ]

    @property
    def graph_safe(self) -> bool:
        return self.dense  # the grouped path reads the step's adapters on the host

    def set_adapter(
        self,
        slot: int,
        shard_id: Any,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> None:
        """Load one output piece's full (unsharded) pair ``A [r, in]``, ``B [out, r]`` into
        ``slot``; this rank keeps its part, as the layer's weights do."""
        index = [shard for shard, _ in self.pieces].index(shard_id)
        rank = lora_a.shape[0]
        if rank > self.max_rank:
            raise ValueError(f"LoRA rank {rank} exceeds max_rank {self.max_rank}")
        a, b = self.layer.shard_lora(lora_a, lora_b, shard_id)
        self.lora_a[index][slot].zero_()
        self.lora_b[index][slot].zero_()
        self.lora_a[index][slot, :rank].copy_(a)
        self.lora_b[index][slot, :rank].copy_((b * scaling).T)

    def clear_adapter(self, slot: int) -> None:
        for a, b in zip(self.lora_a, self.lora_b):
            a[slot].zero_()
            b[slot].zero_()

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> None:
        slots = self.slots.token_slots
        if slots is None:
            return
        if self.dense:
            self._add_dense(x, y)
            return
        for adapter in torch.unique(slots[slots != NO_ADAPTER]).tolist():
            rows = (slots == adapter).nonzero().squeeze(1)
            x_rows = x.index_select(0, rows)
            offset = 0
            for a, b, (_, width) in zip(self.lora_a, self.lora_b, self.pieces):
                delta = (x_rows @ a[adapter].T) @ b[adapter]
                y[:, offset : offset + width].index_add_(0, rows, delta)
                offset += width

    def _add_dense(self, x: torch.Tensor, y: torch.Tensor) -> None:
        columns = self.max_adapters * self.max_rank
        mask = self.slots.rank_mask(self.max_adapters, self.max_rank, x.dtype)
        shrunk = x @ self.lora_a_all.view(-1, self.layer.input_size).T
        shrunk = shrunk.view(x.shape[0], len(self.pieces), columns) * mask.unsqueeze(1)
        offset = 0
        for index, (b, (_, width)) in enumerate(zip(self.lora_b, self.pieces)):
            y[:, offset : offset + width] += shrunk[:, index] @ b.view(columns, width)
            offset += width


class TritonLoRA(TorchLoRA):
    """The same slots and weights as :class:`TorchLoRA`, the delta computed by the Triton
    shrink/expand kernels of :mod:`engine_service.layers.triton_lora` (CUDA; CPU only under
    Triton's interpreter). No host sync: the tokens are grouped by slot on the device once
    per step and every layer's launches reuse the grouping."""

    @property
    def graph_safe(self) -> bool:
        return True

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.slots.token_slots is None:
            return
        from engine_service.layers.triton_lora import add_lora_delta

        add_lora_delta(
            x,
            y,
            self.slots.token_slots,
            self.lora_a_all,
            self.lora_b,
            [width for _, width in self.pieces],
            self.slots.groups(self.max_adapters),
        )


def warm_up_triton(deltas: Iterable[TorchLoRA]) -> int:
    """Compile every Triton variant the deltas can pick (a tile shape per step size class and
    layer shape) on dummy rows of slot 0, so that no serving step stalls on Triton's JIT; the
    outputs are scratch. Returns the number of launches of :func:`add_lora_delta`."""
    from engine_service.layers.triton_lora import add_lora_delta, block_m

    sizes = {block_m(n): n for n in (1, 17, 257)}.values()  # one step size per tile shape
    shapes = {
        (tuple(d.lora_a_all.shape), tuple(w for _, w in d.pieces), d.lora_a_all.dtype): d
        for d in deltas
        if isinstance(d, TritonLoRA)
    }
    for delta in shapes.values():
        a = delta.lora_a_all
        widths = [w for _, w in delta.pieces]
        for n in sizes:
            x = a.new_zeros(n, a.shape[-1])
            slots = torch.zeros(n, dtype=torch.int64, device=a.device)
            add_lora_delta(x, a.new_zeros(n, sum(widths)), slots, a, delta.lora_b, widths)
    return len(shapes) * len(sizes)


def lora_backend(device: torch.device, backend: str = "auto") -> type[TorchLoRA]:
    """The delta class for ``backend``: ``"torch"``, ``"triton"``, or ``"auto"`` (Triton's
    kernels on CUDA when Triton imports, the torch path otherwise)."""
    if backend == "torch":
        return TorchLoRA
    if backend == "triton":
        return TritonLoRA
    if backend != "auto":
        raise ValueError(f"unknown LoRA backend {backend!r}: use auto, torch or triton")
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return TorchLoRA
        return TritonLoRA
    return TorchLoRA


def attach_lora(
    net: nn.Module,
    target_modules: Iterable[str],
    max_adapters: int,
    max_rank: int,
    backend: str = "auto",
) -> tuple[LoRASlots, dict[str, TorchLoRA]]:
    """Give every linear layer of ``net`` whose name ends in one of ``target_modules``
    (``"qkv_proj"``, ``"down_proj"``, ...) a LoRA delta (see :func:`lora_backend`), all
    reading one :class:`LoRASlots`; returns the slots and the deltas by module name."""
    targets = tuple(target_modules)
    slots = LoRASlots()
    deltas: dict[str, TorchLoRA] = {}
    for name, module in net.named_modules():
        if isinstance(module, LinearBase) and name.rsplit(".", 1)[-1] in targets:
            delta_class = lora_backend(module.weight.device, backend)
            module.lora = deltas[name] = delta_class(module, slots, max_adapters, max_rank)
    if not deltas:
        raise ValueError(f"no linear layer of the model is named any of {list(targets)}")
    slots.graph_safe = all(delta.graph_safe for delta in deltas.values())
    warm_up_triton(deltas.values())
    return slots, deltas
