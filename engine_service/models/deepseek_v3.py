"""DeepSeek-V3: multi-head latent attention, shared plus fine-grained routed experts, MTP.

- Attention is MLA (:mod:`engine_service.layers.mla`): the paged cache holds each token's
  compressed latent and rope key, so a block is ``kv_lora_rank + qk_rope_head_dim`` wide per
  layer instead of ``2 x heads x head_dim`` (:meth:`DeepseekV3Config.kv_block_shape`).
- The first ``first_k_dense_replace`` layers have a dense gated MLP; the others a mixture of
  ``n_routed_experts`` small experts plus ``n_shared_experts`` always-on ones.
- Routing (:func:`grouped_topk`) scores experts with a sigmoid, adds the learned
  ``e_score_correction_bias`` for the choice only, keeps the ``topk_group`` best of
  ``n_group`` expert groups (a group scores the sum of its two best experts), takes the top
  ``num_experts_per_tok`` there, and weights them by their unbiased scores, renormalised
  (``norm_topk_prob``) and times ``routed_scaling_factor``.
- The ``num_nextn_predict_layers`` multi-token-prediction layers that follow the decoder in
  real checkpoints (``model.layers.{num_hidden_layers + j}``) are not part of this model; the
  ``mtp`` speculative method loads them with :func:`load_mtp` (:class:`DeepseekV3MTP`).

FP8 checkpoints (``quantization_config``) are refused: load a BF16 conversion.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from engine_service.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine_service.layers.linear import ReplicatedLinear
from engine_service.layers.mla import MLAPlan, MultiHeadLatentAttention
from engine_service.layers.mlp import GatedMLP
from engine_service.layers.moe import FusedMoE, expert_weight_mapping
from engine_service.layers.norms import RMSNorm
from engine_service.layers.paged_attention import AttentionBackend, AttentionMetadata
from engine_service.layers.parallel import SINGLE, TensorParallel
from engine_service.layers.rotary import RotaryEmbedding, yarn_mscale
from engine_service.models.causal_lm import WeightMapping
from engine_service.models.config import ModelConfig


@dataclass(slots=True)
class DeepseekV3Config(ModelConfig):
    """The common fields plus MLA's ranks, the experts' layout and routing, and MTP."""

    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_interleave: bool = True
    attention_scale: float = 1.0
    num_routed_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    num_shared_experts: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    num_mtp_layers: int = 0

    def kv_block_shape(self, block_size: int) -> tuple[int, ...]:
        # One plane, one "head": the latent and the rope key of each token.
        return (self.num_layers, 1, block_size, 1, self.kv_lora_rank + self.qk_rope_head_dim)

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.num_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )


def grouped_topk(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's group-limited routing (``noaux_tc``): ``(weights [T, k] fp32, ids [T, k])``.

    The bias steers which experts are chosen (auxiliary-loss-free load balancing) but not
    their weights, which are the plain sigmoid scores."""
    scores = router_logits.float().sigmoid()
    num_tokens, num_experts = scores.shape
    choice = scores + correction_bias.float()
    group_scores = choice.view(num_tokens, n_group, -1).topk(2, dim=-1).values.sum(dim=-1)
    groups = group_scores.topk(topk_group, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
    expert_mask = (
        group_mask[:, :, None]
        .expand(-1, -1, num_experts // n_group)
        .reshape(num_tokens, num_experts)
    )
    choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


class DeepseekV3Router(nn.Module):
    """The MoE gate: fp32 logits over the experts and the choice bias (both kept in fp32)."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts), requires_grad=False)
        self.weight.keep_fp32 = self.e_score_correction_bias.keep_fp32 = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float() @ self.weight.float().T


class DeepseekV3MoE(nn.Module):
    """Routed experts (through the shared MoE kernel) plus the shared experts' gated MLP."""

    def __init__(self, config: DeepseekV3Config, tp: TensorParallel) -> None:
        super().__init__()
        self.config = config
        self.gate = DeepseekV3Router(config.hidden_size, config.num_routed_experts)
        self.experts = FusedMoE(
            config.num_routed_experts,
            config.num_experts_per_tok,
            config.hidden_size,
            config.moe_intermediate_size,
            renormalize=config.norm_topk_prob,
            hidden_act=config.hidden_act,
            tp=tp,
        )
        self.shared_experts = None
        if config.num_shared_experts:
            self.shared_experts = GatedMLP(
                config.hidden_size,
                config.moe_intermediate_size * config.num_shared_experts,
                config.hidden_act,
                False,
                tp,
            )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        c = self.config
        weights, ids = grouped_topk(
            self.gate(hidden),
            self.gate.e_score_correction_bias,
            c.num_experts_per_tok,
            c.n_group,
            c.topk_group,
            c.norm_topk_prob,
            c.routed_scaling_factor,
        )
        out = self.experts.forward_routed(hidden, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        return out


class DeepseekV3DecoderLayer(nn.Module):
    """Pre-norm residual block: MLA, then a dense MLP or the mixture of experts.

    ``layer`` is the block's index among the checkpoint's layers (which decides dense or
    MoE); ``cache_layer`` its layer in the KV cache it writes."""

    def __init__(
        self,
        config: DeepseekV3Config,
        layer: int,
        tp: TensorParallel,
        cache_layer: int | None = None,
    ) -> None:
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(
            c.hidden_size,
            c.num_heads,
            c.q_lora_rank,
            c.kv_lora_rank,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            layer if cache_layer is None else cache_layer,
            scale=c.attention_scale,
            rms_norm_eps=c.rms_norm_eps,
            rope_interleave=c.rope_interleave,
            bias=c.qkv_bias,
            tp=tp,
        )
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if c.is_moe_layer(layer):
            self.mlp: nn.Module = DeepseekV3MoE(c, tp)
        else:
            self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, False, tp)

    def forward(self, hidden, cos_sin, kv_cache, meta, plan: MLAPlan) -> torch.Tensor:
        hidden = hidden + self.self_attn(
            self.input_layernorm(hidden), cos_sin, kv_cache, meta, plan
        )
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DeepseekV3Model(nn.Module):
    """Embedding, decoder layers, final norm: the ``model.`` prefix of the checkpoint."""

    def __init__(self, config: DeepseekV3Config, tp: TensorParallel) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            DeepseekV3DecoderLayer(config, i, tp) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.qk_rope_head_dim, config.rope_theta, config.rope_scaling
        )

    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cos_sin = self.rotary_emb.cos_sin(positions, hidden.dtype)
        plan = MLAPlan.build(meta, kv_cache.shape[3])
        for layer in self.layers:
            hidden = layer(hidden, cos_sin, kv_cache, meta, plan)
        return self.norm(hidden)


def _mapping(num_experts: int) -> WeightMapping:
    # Per-expert tensors first: their names contain "gate_proj" too.
    return {
        **expert_weight_mapping(num_experts, "gate_proj", "up_proj", "down_proj"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }


def parse_deepseek_config(raw: dict[str, Any], architecture: str) -> DeepseekV3Config:
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?")
        raise ValueError(
            f"quantized DeepSeek checkpoints ({method}) are not supported; "
            "load a BF16 conversion of the checkpoint"
        )
    if raw.get("scoring_func", "sigmoid") != "sigmoid":
        raise ValueError(f"DeepSeek routing scoring_func {raw['scoring_func']!r} is not supported")
    base = ModelConfig.from_hf(raw, architecture)
    common = {f.name: getattr(base, f.name) for f in fields(ModelConfig)}
    nope, rope = raw["qk_nope_head_dim"], raw["qk_rope_head_dim"]
    config = DeepseekV3Config(
        **common,
        q_lora_rank=raw.get("q_lora_rank"),
        kv_lora_rank=raw["kv_lora_rank"],
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=raw["v_head_dim"],
        rope_interleave=bool(raw.get("rope_interleave", True)),
        num_routed_experts=raw.get("n_routed_experts") or 0,
        num_experts_per_tok=raw.get("num_experts_per_tok") or 1,
        moe_intermediate_size=raw.get("moe_intermediate_size") or 0,
        num_shared_experts=raw.get("n_shared_experts") or 0,
        first_k_dense_replace=raw.get("first_k_dense_replace") or 0,
        moe_layer_freq=raw.get("moe_layer_freq") or 1,
        n_group=raw.get("n_group") or 1,
        topk_group=raw.get("topk_group") or 1,
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
        num_mtp_layers=raw.get("num_nextn_predict_layers") or 0,
    )
    # Every query head attends with its full (nope + rope) width; the latent is one "head".
    config.num_kv_heads = config.num_heads
    config.head_dim = nope + rope
    scale = (nope + rope) ** -0.5
    scaling = config.rope_scaling
    if scaling is not None and scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
    config.attention_scale = scale
    if config.num_routed_experts % config.n_group:
        raise ValueError(
            f"n_routed_experts ({config.num_routed_experts}) is not divisible by "
            f"n_group ({config.n_group})"
        )
    return config


class DeepseekV3ForCausalLM(nn.Module):
    architecture: ClassVar[str] = "DeepseekV3ForCausalLM"
    # MLA reads its latent cache itself; the engine's attention backend is not used.
    computes_own_attention: ClassVar[bool] = True
    # Every layer is built on the tensor-parallel layers (see models/loader.py).
    supports_tensor_parallel: ClassVar[bool] = True
    packed_modules_mapping: WeightMapping

    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ModelConfig:
        return parse_deepseek_config(raw, cls.architecture)

    def __init__(
        self, config: DeepseekV3Config, backend: AttentionBackend, tp: TensorParallel = SINGLE
    ) -> None:
        super().__init__()
        self.config = config
        self.packed_modules_mapping = _mapping(config.num_routed_experts)
        self.model = DeepseekV3Model(config, tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_cache, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits of ``hidden``'s rows; under tensor parallelism on the first rank only."""
        return self.lm_head.compute_logits(hidden)


# -- multi-token prediction ------------------------------------------------------------------


class SharedHead(nn.Module):
    def __init__(self, config: DeepseekV3Config, tp: TensorParallel) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)


class DeepseekV3MTPLayer(DeepseekV3DecoderLayer):
    """One MTP module: ``eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)])`` through a decoder
    block; ``shared_head`` (norm, head) gives the logits of ``t_{i+2}``."""

    def __init__(self, config: DeepseekV3Config, layer: int, cache_layer: int, tp) -> None:
        super().__init__(config, layer, tp, cache_layer)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = ReplicatedLinear(2 * config.hidden_size, config.hidden_size)
        self.shared_head = SharedHead(config, tp)


class _MTPLayers(nn.Module):
    def __init__(self, config: DeepseekV3Config, tp: TensorParallel) -> None:
        super().__init__()
        first = config.num_layers
        self.layers = nn.ModuleDict(
            {
                str(first + j): DeepseekV3MTPLayer(config, first + j, j, tp)
                for j in range(config.num_mtp_layers)
            }
        )


class DeepseekV3MTP(nn.Module):
    """The checkpoint's MTP layers as a model of their own, over a cache of their own
    (``num_mtp_layers`` latent layers, same block ids as the target's pool).

    ``forward`` runs row ``t`` as (position ``p``, token ``t_{p+1}``, the hidden state
    ``h_p`` set in :attr:`previous_hidden` beforehand) through MTP layer ``step % layers``;
    :meth:`compute_logits` keeps the rows' pre-norm hidden states in :attr:`last_hidden`,
    which feed the next draft position. The token embedding is the target's own (DeepSeek
    shares it; the checkpoint's copy under each MTP layer is not loaded again).

    Under tensor parallelism the layer is split like the target's and every rank runs each
    MTP step; only the first rank (the proposer's) holds :attr:`previous_hidden`, which the
    forward broadcasts to the others before it reads it.
    """

    computes_own_attention: ClassVar[bool] = True

    def __init__(
        self, config: DeepseekV3Config, embed_tokens: nn.Module, tp: TensorParallel = SINGLE
    ) -> None:
        super().__init__()
        self.config = config
        self.packed_modules_mapping = _mapping(config.num_routed_experts)
        self.model = _MTPLayers(config, tp)
        self.rotary_emb = RotaryEmbedding(
            config.qk_rope_head_dim, config.rope_theta, config.rope_scaling
        )
        self._embed = (embed_tokens,)  # shared with the target, not a parameter here
        self.tp = tp
        self.previous_hidden: torch.Tensor | None = None
        self.last_hidden: torch.Tensor | None = None
        self.step = 0

    def kv_block_shape(self, block_size: int) -> tuple[int, ...]:
        return (self.config.num_mtp_layers, *self.config.kv_block_shape(block_size)[1:])

    def _layer(self) -> DeepseekV3MTPLayer:
        layers = list(self.model.layers.values())
        return layers[self.step % len(layers)]

    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        layer = self._layer()
        embeds = self._embed[0](input_ids)
        previous = self._previous_hidden(input_ids.shape[0], embeds)
        # Position 0 has no previous token: its embedding is masked, as in training.
        embeds = torch.where(positions[:, None] == 0, 0, embeds)
        hidden = layer.eh_proj(torch.cat((layer.enorm(embeds), layer.hnorm(previous)), -1))
        cos_sin = self.rotary_emb.cos_sin(positions, hidden.dtype)
        plan = MLAPlan.build(meta, kv_cache.shape[3])
        return layer(hidden, cos_sin, kv_cache, meta, plan)

    def _previous_hidden(self, num_rows: int, like: torch.Tensor) -> torch.Tensor:
        """The target hidden states of the step's rows: the proposer's on the first rank,
        broadcast from there to the others under tensor parallelism."""
        if self.tp.rank == 0:
            assert self.previous_hidden is not None, "set previous_hidden before an MTP forward"
            previous = self.previous_hidden.to(like.dtype).contiguous()
        else:
            previous = like.new_empty(num_rows, self.config.hidden_size)
        return self.tp.broadcast(previous)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        self.last_hidden = hidden
        head = self._layer().shared_head
        return head.head.compute_logits(head.norm(hidden))


def mtp_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]], config: DeepseekV3Config
) -> Iterator[tuple[str, torch.Tensor]]:
    """Only the checkpoint's MTP-layer tensors (``model.layers.{L + j}.``)."""
    prefixes = tuple(f"model.layers.{config.num_layers + j}." for j in range(config.num_mtp_layers))
    for name, tensor in tensors:
        if name.startswith(prefixes) and ".embed_tokens." not in name:
            yield name, tensor


def check_mtp_checkpoint(config: ModelConfig, path: Path) -> DeepseekV3Config:
    """The target's config if its checkpoint declares MTP layers; a clear error otherwise."""
    if not isinstance(config, DeepseekV3Config):
        raise ValueError(
            f'speculative method "mtp" needs a checkpoint with multi-token-prediction layers '
            f"(DeepSeek-V3 layout); {config.architecture} has none"
        )
    if config.num_mtp_layers < 1:
        raise ValueError(
            f'speculative method "mtp" needs MTP layers, but {path}/config.json sets '
            "num_nextn_predict_layers to 0 (or leaves it out)"
        )
    return config
