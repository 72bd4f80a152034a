"""Mixture of experts: top-k routing, the experts' stacked weights, and the kernel seam.

:class:`FusedMoE` holds every expert's gated MLP stacked, ``w13 [E, 2*I, H]`` (gate rows then
up rows) and ``w2 [E, H, I]``, and loads a checkpoint's per-expert tensors by shard id
``(expert, "gate" | "up" | "down")``; :func:`expert_weight_mapping` writes those entries for a
model's weight mapping. The routed computation is an :class:`MoEKernel`: the torch reference
here, a fused (Triton) kernel later, same arguments. With tensor parallelism every rank holds
a slice of each expert's inner dimension and the ranks' outputs are summed; with expert
parallelism (``tp.expert_parallel``) every rank holds whole experts, a share of them, and
tokens travel to them (:mod:`engine_service.layers.expert_parallel`).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import nn

from engine_service.layers.expert_parallel import ExpertParallel
from engine_service.layers.mlp import activation
from engine_service.layers.parallel import SINGLE, TensorParallel, divide


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``top_k`` experts by softmax probability: ``(weights [T, k] fp32,
    ids [T, k] int64)``. ``renormalize`` rescales the chosen weights to sum to one (Mixtral,
    Qwen MoE's ``norm_topk_prob``); otherwise they keep their softmax values."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class MoEKernel(abc.ABC):
    """Runs the routed experts: ``out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])``
    with ``expert_e(x) = w2[e] (act(gate_e x) * up_e x)``; returns ``[T, H]`` in ``x``'s dtype.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def forward(
        self,
        x: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        weights: torch.Tensor,
        ids: torch.Tensor,
        hidden_act: str,
    ) -> torch.Tensor: ...


class TorchMoEKernel(MoEKernel):
    """The reference: sorts the (token, expert) pairs by expert and runs each expert once
    on its group of tokens. It reads the group sizes on the host, so it is not for graphs."""

    name = "torch"

    def forward(self, x, w13, w2, weights, ids, hidden_act):
        act = activation(hidden_act)
        top_k = ids.shape[1]
        flat_ids = ids.flatten()
        order = torch.argsort(flat_ids, stable=True)
        tokens = order // top_k
        flat_weights = weights.flatten()[order].to(x.dtype)
        counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = tokens[start : start + count]
            gate, up = (x.index_select(0, rows) @ w13[expert].T).chunk(2, dim=-1)
            expert_out = (act(gate) * up) @ w2[expert].T
            out.index_add_(0, rows, expert_out * flat_weights[start : start + count, None])
            start += count
        return out


class FusedMoE(nn.Module):
    """All experts of one MoE layer; ``forward(x, router_logits)`` routes and runs them.

    The router itself (a replicated linear producing ``router_logits``) belongs to the model,
    whose checkpoints name and place it differently.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool = True,
        hidden_act: str = "silu",
        tp: TensorParallel = SINGLE,
        kernel: MoEKernel | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize, self.hidden_act = renormalize, hidden_act
        self.tp = tp
        self.kernel = kernel or TorchMoEKernel()
        # Expert parallel: whole experts, this rank's range of them; else a slice of all.
        self.ep = (
            ExpertParallel(tp.rank, tp.size, num_experts, tp.group)
            if (tp.expert_parallel and tp.size > 1)
            else None
        )
        slices = 1 if self.ep is not None else tp.size
        self.inner = divide(intermediate_size, slices, "expert intermediate size")
        self.full_inner, self.hidden_size = intermediate_size, hidden_size
        first, local = (self.ep.start, self.ep.num_local) if self.ep else (0, num_experts)
        self.first_expert = first
        self.w13 = nn.Parameter(
            torch.empty(local, 2 * self.inner, hidden_size), requires_grad=False
        )
        self.w2 = nn.Parameter(torch.empty(local, hidden_size, self.inner), requires_grad=False)
        experts = range(first, first + local)
        self.w13.weight_loader = self.weight_loader
        self.w13.shard_ids = tuple((e, piece) for e in experts for piece in ("gate", "up"))
        self.w2.weight_loader = self.weight_loader
        self.w2.shard_ids = tuple((e, "down") for e in experts)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any) -> None:
        """Copy expert ``e``'s full ``gate``/``up`` ``[I, H]`` or ``down`` ``[H, I]`` tensor."""
        expert, piece = shard_id
        if not 0 <= expert < self.num_experts or piece not in ("gate", "up", "down"):
            raise ValueError(f"unknown expert shard {shard_id!r}")
        if self.ep is not None and not self.ep.holds(expert):
            return  # another rank's expert
        expert -= self.first_expert
        start = 0 if self.ep is not None else self.tp.rank * self.inner
        if piece == "down":
            expected, rows = (
                (self.hidden_size, self.full_inner),
                loaded.narrow(1, start, self.inner),
            )
            target = param.data[expert]
        else:
            expected, rows = (
                (self.full_inner, self.hidden_size),
                loaded.narrow(0, start, self.inner),
            )
            offset = 0 if piece == "gate" else self.inner
            target = param.data[expert, offset : offset + self.inner]
        if tuple(loaded.shape) != expected:
            raise ValueError(f"expert {piece} shape {tuple(loaded.shape)} != {expected}")
        target.copy_(rows)

    def local_forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum (its slice of every expert's inner dimension)."""
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        return self.kernel.forward(x, self.w13, self.w2, weights, ids, self.hidden_act)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if self.ep is not None:
            weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
            return self.ep.forward(x, weights, ids, self._local_experts)
        return self.tp.all_reduce(self.local_forward(x, router_logits))

    def forward_routed(
        self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        """Run the experts on routing the model decided itself (DeepSeek's grouped sigmoid
        top-k): ``weights [T, k]`` and expert ``ids [T, k]``."""
        if self.ep is not None:
            return self.ep.forward(x, weights, ids, self._local_experts)
        local = self.kernel.forward(x, self.w13, self.w2, weights, ids, self.hidden_act)
        return self.tp.all_reduce(local)

    def _local_experts(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """This rank's experts on the rows sent to them (one expert each, weight one)."""
        ones = torch.ones((rows.shape[0], 1), dtype=torch.float32, device=rows.device)
        return self.kernel.forward(
            rows, self.w13, self.w2, ones, local_ids.unsqueeze(1), self.hidden_act
        )


def expert_weight_mapping(
    num_experts: int,
    gate: str,
    up: str,
    down: str,
    checkpoint_prefix: str = "experts",
    param_prefix: str = "experts",
) -> dict[str, tuple[str, Any]]:
    """Weight-mapping entries from a checkpoint's per-expert tensors to a :class:`FusedMoE`
    named ``param_prefix``; e.g. Mixtral: ``expert_weight_mapping(8, "w1", "w3", "w2")``."""
    mapping: dict[str, tuple[str, Any]] = {}
    for e in range(num_experts):
        for name, target, piece in ((gate, "w13", "gate"), (up, "w13", "up"), (down, "w2", "down")):
            mapping[f"{checkpoint_prefix}.{e}.{name}.weight"] = (
                f"{param_prefix}.{target}",
                (e, piece),
            )
    return mapping
