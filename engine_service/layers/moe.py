"""Mixture of experts: top-k routing, the experts' stacked weights, and the kernel seam.

:class:`FusedMoE` holds every expert's gated MLP stacked, ``w13 [E, 2*I, H]`` (gate rows then
up rows) and ``w2 [E, H, I]``, optionally with biases ``w13_bias [E, 2*I]`` and
``w2_bias [E, H]`` (gpt-oss). It loads a checkpoint's per-expert tensors by shard id
``(expert, "gate" | "up" | "down")`` (:func:`expert_weight_mapping` writes those entries for a
model's weight mapping) or whole stacked tensors by a :class:`StackedExperts` shard id.

The routed computation is an :class:`MoEKernel`, all with the same arguments:

- :class:`TorchMoEKernel` (CPU, and any device): the (token, expert) pairs sorted by expert,
  gathered once, one GEMM pair per expert on its contiguous group, one scatter-add back;
- ``TritonMoEKernel`` (CUDA, :mod:`engine_service.layers.moe_triton`): the same sort, padded
  per expert to the tile height, then two grouped GEMM kernels (gate/up with the activation
  fused, then down with the routing weight), with no host synchronisation, so that decode
  steps capture into CUDA graphs;
- :class:`LoopMoEKernel`: the per-expert loop of the reference implementations (a mask scan
  per expert), kept as the oracle and the benchmarks' baseline.

With tensor parallelism every rank holds a slice of each expert's inner dimension and the
ranks' outputs are summed (rank 0 alone adds the down bias). With expert parallelism
(``tp.expert_parallel``) every rank holds whole experts, its range of them (biases
included), and tokens travel to them (:mod:`engine_service.layers.expert_parallel`).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from engine_service.layers.expert_parallel import ExpertParallel
from engine_service.layers.mlp import ACTIVATIONS, activation
from engine_service.layers.parallel import SINGLE, TensorParallel, divide

# gpt-oss's clamped SwiGLU: out = (clamp(up, -L, L) + 1) * g * sigmoid(ALPHA * g), with
# g = clamp(gate, max=L). vLLM names it "swigluoai"; the constants are the checkpoints'.
SWIGLU_OAI = "swigluoai"
SWIGLU_OAI_ALPHA = 1.702
SWIGLU_OAI_LIMIT = 7.0

GatedActivation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gated_activation(name: str) -> GatedActivation:
    """``f(gate, up)`` for an expert's activation: ``act(gate) * up`` for a plain activation
    name, or gpt-oss's clamped SwiGLU for ``"swigluoai"``."""
    if name == SWIGLU_OAI:
        return _swiglu_oai
    act = activation(name)
    return lambda gate, up: act(gate) * up


def _swiglu_oai(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate = gate.clamp(max=SWIGLU_OAI_LIMIT)
    up = up.clamp(-SWIGLU_OAI_LIMIT, SWIGLU_OAI_LIMIT)
    return (up + 1) * gate * torch.sigmoid(gate * SWIGLU_OAI_ALPHA)


SUPPORTED_EXPERT_ACTIVATIONS = (*ACTIVATIONS, SWIGLU_OAI)


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``top_k`` experts by softmax probability: ``(weights [T, k] fp32,
    ids [T, k] int64)``. ``renormalize`` rescales the chosen weights to sum to one (Mixtral,
    Qwen MoE's ``norm_topk_prob``, and gpt-oss, whose softmax over the top-k logits is the
    same thing); otherwise they keep their softmax values."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class MoEKernel(abc.ABC):
    """Runs the routed experts: ``out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])``
    with ``expert_e(x) = w2[e] f(gate_e x + bg_e, up_e x + bu_e) + b2_e`` and ``f`` the
    gated activation :func:`gated_activation` names; returns ``[T, H]`` in ``x``'s dtype.
    ``w13_bias`` ``[E, 2*I]`` and ``w2_bias`` ``[E, H]`` are optional."""

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
        w13_bias: torch.Tensor | None = None,
        w2_bias: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class ExpertOrder:
    """The (token, slot) pairs of a routing sorted by expert: pair ``p = t * top_k + j``
    sits at sorted position ``i`` with ``order[i] = p``; expert ``e``'s pairs are the run
    ``offsets[e] : offsets[e + 1]``."""

    order: torch.Tensor  # [T*k] int64, pair index of each sorted position
    counts: torch.Tensor  # [E] int64
    offsets: torch.Tensor  # [E+1] int64


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> ExpertOrder:
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return ExpertOrder(order, counts, offsets)


class TorchMoEKernel(MoEKernel):
    """Grouped by expert: gather the routed rows once in expert order, run each expert that
    got tokens once on its contiguous group, scale by the routing weights and scatter-add
    back. Nothing loops over tokens; the group sizes are read on the host, so it is not for
    CUDA graphs (the Triton kernel is)."""

    name = "torch"

    def forward(self, x, w13, w2, weights, ids, hidden_act, w13_bias=None, w2_bias=None):
        num_tokens, top_k = ids.shape
        if num_tokens == 0:
            return torch.zeros_like(x)
        glu = gated_activation(hidden_act)
        grouped = sort_by_expert(ids, w13.shape[0])
        tokens = grouped.order // top_k
        rows = x.index_select(0, tokens)  # [T*k, H] in expert order
        out_rows = torch.empty_like(rows)
        bounds = grouped.offsets.tolist()
        for expert in torch.nonzero(grouped.counts).flatten().tolist():
            start, end = bounds[expert], bounds[expert + 1]
            gate_up = rows[start:end] @ w13[expert].T
            if w13_bias is not None:
                gate_up += w13_bias[expert]
            gate, up = gate_up.chunk(2, dim=-1)
            torch.matmul(glu(gate, up), w2[expert].T, out=out_rows[start:end])
            if w2_bias is not None:
                out_rows[start:end] += w2_bias[expert]
        out_rows *= weights.flatten()[grouped.order].to(x.dtype)[:, None]
        out = torch.zeros_like(x)
        out.index_add_(0, tokens, out_rows)
        return out


class LoopMoEKernel(MoEKernel):
    """The per-expert loop of the reference implementations (``transformers``' eager MoE):
    for every expert, scan the routing for its tokens, gather them, run the expert, add its
    weighted output back. The oracle for the other kernels and the benchmarks' baseline."""

    name = "loop"

    def forward(self, x, w13, w2, weights, ids, hidden_act, w13_bias=None, w2_bias=None):
        glu = gated_activation(hidden_act)
        out = torch.zeros_like(x)
        for expert in range(w13.shape[0]):
            token_idx, slot = torch.where(ids == expert)
            if token_idx.numel() == 0:
                continue
            gate_up = x[token_idx] @ w13[expert].T
            if w13_bias is not None:
                gate_up = gate_up + w13_bias[expert]
            gate, up = gate_up.chunk(2, dim=-1)
            expert_out = glu(gate, up) @ w2[expert].T
            if w2_bias is not None:
                expert_out = expert_out + w2_bias[expert]
            scale = weights[token_idx, slot, None].to(x.dtype)
            out.index_add_(0, token_idx, expert_out * scale)
        return out


@functools.cache
def default_moe_kernel(device_type: str) -> MoEKernel:
    """The fused Triton kernel on CUDA (when Triton imports), the grouped torch one elsewhere."""
    if device_type == "cuda":
        try:
            from engine_service.layers.moe_triton import TritonMoEKernel
        except ImportError:
            return TorchMoEKernel()
        return TritonMoEKernel()
    return TorchMoEKernel()


@dataclass(frozen=True, slots=True)
class StackedExperts:
    """Shard id of a checkpoint tensor holding every expert at once.

    ``piece``: ``"gate_up"`` (``[E, 2I, H]``, or ``[E, H, 2I]`` when ``transposed``), ``"down"``
    (``[E, H, I]``, or ``[E, I, H]`` transposed), ``"gate_up_bias"`` (``[E, 2I]``),
    ``"down_bias"`` (``[E, H]``). ``interleaved``: gate and up alternate along the ``2I``
    dimension (gpt-oss) instead of gate first, then up.
    """

    piece: str
    transposed: bool = False
    interleaved: bool = False


class FusedMoE(nn.Module):
    """All experts of one MoE layer; ``forward(x, router_logits)`` routes and runs them.

    The router itself (a replicated linear producing ``router_logits``) belongs to the model,
    whose checkpoints name and place it differently. ``kernel`` None: the device's default
    (:func:`default_moe_kernel`), chosen at the first forward.
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
        bias: bool = False,
    ) -> None:
        super().__init__()
        if hidden_act not in SUPPORTED_EXPERT_ACTIVATIONS:
            raise ValueError(
                f"expert activation {hidden_act!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_EXPERT_ACTIVATIONS)}"
            )
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize, self.hidden_act = renormalize, hidden_act
        self.tp = tp
        self.kernel = kernel
        # Expert parallel: whole experts, this rank's range of them (over all data-parallel
        # x tensor-parallel ranks); else a slice of all, over this rank's tensor-parallel
        # group only (each data-parallel rank then holds every expert, split TP ways).
        self.ep = (
            ExpertParallel(
                tp.ep_rank,
                tp.ep_size,
                num_experts,
                tp.ep_group,
                share_rank=tp.rank,
                share_size=tp.size,
                share_group=tp.group,
            )
            if tp.expert_parallel and tp.ep_size > 1
            else None
        )
        slices = 1 if self.ep is not None else tp.size
        self.inner = divide(intermediate_size, slices, "expert intermediate size")
        self.full_inner, self.hidden_size = intermediate_size, hidden_size
        first, local = (self.ep.start, self.ep.num_local) if self.ep else (0, num_experts)
        self.first_expert, self.num_local_experts = first, local
        self.w13 = nn.Parameter(
            torch.empty(local, 2 * self.inner, hidden_size), requires_grad=False
        )
        self.w2 = nn.Parameter(torch.empty(local, hidden_size, self.inner), requires_grad=False)
        experts = range(first, first + local)
        self.w13.weight_loader = self.weight_loader
        self.w13.shard_ids = tuple((e, piece) for e in experts for piece in ("gate", "up"))
        self.w2.weight_loader = self.weight_loader
        self.w2.shard_ids = tuple((e, "down") for e in experts)
        self.w13_bias: nn.Parameter | None = None
        self.w2_bias: nn.Parameter | None = None
        if bias:
            self.w13_bias = nn.Parameter(torch.empty(local, 2 * self.inner), requires_grad=False)
            self.w2_bias = nn.Parameter(torch.empty(local, hidden_size), requires_grad=False)
            self.w13_bias.weight_loader = self.w2_bias.weight_loader = self.weight_loader
            self.w13_bias.shard_ids = (StackedExperts("gate_up_bias"),)
            self.w2_bias.shard_ids = (StackedExperts("down_bias"),)

    def expect_stacked(self, gate_up: StackedExperts, down: StackedExperts) -> None:
        """Declare that the checkpoint stores all experts in one tensor each (so loading
        checks for those shards instead of per-expert ones)."""
        self.w13.shard_ids = (gate_up,)
        self.w2.shard_ids = (down,)
        if self.w13_bias is not None:
            self.w13_bias.shard_ids = (dataclasses.replace(gate_up, piece="gate_up_bias"),)
            self.w2_bias.shard_ids = (dataclasses.replace(down, piece="down_bias"),)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any) -> None:
        """Copy expert ``e``'s full ``gate``/``up`` ``[I, H]`` or ``down`` ``[H, I]`` tensor, or
        a whole :class:`StackedExperts` tensor; this rank's slice of the inner dimension."""
        if isinstance(shard_id, StackedExperts):
            self._load_stacked(param, loaded, shard_id)
            return
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

    def _load_stacked(self, param: nn.Parameter, loaded: torch.Tensor, shard: StackedExperts):
        num, hidden, inner = self.num_experts, self.hidden_size, self.full_inner
        if shard.piece in ("gate_up", "down") and shard.transposed:
            loaded = loaded.transpose(1, 2)
        expected = {
            "gate_up": (num, 2 * inner, hidden),
            "down": (num, hidden, inner),
            "gate_up_bias": (num, 2 * inner),
            "down_bias": (num, hidden),
        }.get(shard.piece)
        if expected is None:
            raise ValueError(f"unknown stacked expert shard {shard!r}")
        if tuple(loaded.shape) != expected:
            raise ValueError(
                f"stacked experts {shard.piece} shape {tuple(loaded.shape)} != {expected}"
            )
        # Expert parallel: this rank's experts, whole; else every expert, this rank's slice.
        loaded = loaded.narrow(0, self.first_expert, self.num_local_experts)
        start = 0 if self.ep is not None else self.tp.rank * self.inner
        if shard.piece in ("gate_up", "gate_up_bias"):
            if shard.interleaved:
                gate, up = loaded[:, 0::2], loaded[:, 1::2]
            else:
                gate, up = loaded[:, :inner], loaded[:, inner:]
            param.data[:, : self.inner].copy_(gate.narrow(1, start, self.inner))
            param.data[:, self.inner :].copy_(up.narrow(1, start, self.inner))
        elif shard.piece == "down":
            param.data.copy_(loaded.narrow(2, start, self.inner))
        elif self.ep is not None:  # down_bias: each expert runs on its own rank only
            param.data.copy_(loaded)
        else:  # down_bias: added once, by rank 0, to the ranks' partial sums
            param.data.copy_(loaded if self.tp.rank == 0 else torch.zeros_like(loaded))

    def local_forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum (its slice of every expert's inner dimension)."""
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        return self._run_experts(x, weights, ids)

    def _run_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        kernel = self.kernel or default_moe_kernel(x.device.type)
        return kernel.forward(
            x, self.w13, self.w2, weights, ids, self.hidden_act, self.w13_bias, self.w2_bias
        )

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
        return self.tp.all_reduce(self._run_experts(x, weights, ids))

    def _local_experts(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """This rank's experts on the rows sent to them (one expert each, weight one)."""
        kernel = self.kernel or default_moe_kernel(rows.device.type)
        ones = torch.ones((rows.shape[0], 1), dtype=torch.float32, device=rows.device)
        return kernel.forward(
            rows,
            self.w13,
            self.w2,
            ones,
            local_ids.unsqueeze(1),
            self.hidden_act,
            self.w13_bias,
            self.w2_bias,
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
