"""The dense pre-norm decoder that the Llama, Mistral and Qwen families share.

A family is a subclass of :class:`DenseCausalLM` that declares its quirks and nothing else:
how it reads ``config.json`` (:meth:`DenseCausalLM.parse_config`: windows, biases), whether
queries and keys get a per-head RMSNorm (``qk_norm``), whether attention has per-head sink
logits (``attention_sinks``), each layer's feed-forward block (:meth:`DenseCausalLM.make_mlp`:
mixture-of-experts families route some layers' tokens to experts), and its weight mapping. Module names
match Hugging Face's (``model.layers.N.self_attn...``), except the stacked ``qkv_proj`` and
``gate_up_proj`` that the mapping fills from the checkpoint's separate projections.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from engine_service.layers.attention import Attention
from engine_service.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine_service.layers.mlp import GatedMLP
from engine_service.layers.norms import RMSNorm
from engine_service.layers.paged_attention import AttentionBackend, AttentionMetadata
from engine_service.layers.parallel import SINGLE, TensorParallel
from engine_service.layers.rotary import RotaryEmbedding
from engine_service.models.causal_lm import WeightMapping
from engine_service.models.config import ModelConfig
from engine_service.models.hidden_states import HiddenStateStore

# The checkpoint's separate projections (and their biases) load as shards of stacked ones.
STACKED_WEIGHT_MAPPING: WeightMapping = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class DenseDecoderLayer(nn.Module):
    """Pre-norm residual block: attention (with an optional per-head q/k norm and the
    layer's sliding window), then the gated MLP."""

    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        backend: AttentionBackend,
        tp: TensorParallel,
        qk_norm: bool,
        mlp: nn.Module | None = None,
        attention_sinks: bool = False,
        norm_in_fp32: bool = False,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, norm_in_fp32)
        self.self_attn = Attention(
            config.hidden_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            layer,
            backend,
            window=config.sliding_windows[layer] if config.sliding_windows else None,
            qkv_bias=config.qkv_bias,
            o_bias=config.o_bias,
            qk_norm_eps=config.rms_norm_eps if qk_norm else None,
            sinks=attention_sinks,
            tp=tp,
        )
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, norm_in_fp32
        )
        if mlp is None:
            mlp = GatedMLP(
                config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias, tp
            )
        self.mlp = mlp

    def forward(
        self,
        hidden: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos_sin, kv_cache, meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DenseModel(nn.Module):
    """Embedding, decoder layers, final norm: the ``model.`` prefix of the checkpoint.

    ``make_mlp(layer)`` builds a layer's feed-forward block (None: the gated MLP)."""

    def __init__(
        self,
        config: ModelConfig,
        backend: AttentionBackend,
        tp: TensorParallel,
        qk_norm: bool,
        make_mlp: Callable[[int], nn.Module] | None = None,
        attention_sinks: bool = False,
        norm_in_fp32: bool = False,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            DenseDecoderLayer(
                config,
                i,
                backend,
                tp,
                qk_norm,
                make_mlp(i) if make_mlp else None,
                attention_sinks,
                norm_in_fp32,
            )
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, norm_in_fp32)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.rope_scaling, config.mrope_section
        )
        # Set once at start when a proposer drafts from our hidden states (EAGLE).
        self.hidden_store: HiddenStateStore | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        mm_rows: torch.Tensor | None = None,
        mm_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``mm_rows``/``mm_embeds``: query rows whose input embedding is an image's
        encoder output instead of their (placeholder) token's embedding."""
        hidden = self.embed_tokens(input_ids)
        if mm_rows is not None:
            hidden = hidden.index_copy(0, mm_rows, mm_embeds.to(hidden.dtype))
        cos_sin = self.rotary_emb.cos_sin(positions, hidden.dtype)
        store = self.hidden_store
        kept: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.layers):
            if store is not None and index in store.layers:
                kept[index] = hidden
            hidden = layer(hidden, cos_sin, kv_cache, meta)
        hidden = self.norm(hidden)
        if store is not None:
            rows = [kept[i] for i in store.layers] + ([hidden] if store.final else [])
            store.write(rows, meta.slot_mapping)
        return hidden


class DenseCausalLM(nn.Module):
    """A dense decoder-only model; subclasses name their architecture and quirks."""

    architecture: ClassVar[str]
    # Every layer here is built on the tensor-parallel layers (see models/loader.py).
    supports_tensor_parallel: ClassVar[bool] = True
    qk_norm: ClassVar[bool] = False
    attention_sinks: ClassVar[bool] = False
    # RMSNorm scales in fp32 and then casts (gpt-oss), rather than casting then scaling.
    norm_in_fp32: ClassVar[bool] = False
    packed_modules_mapping: ClassVar[WeightMapping] = STACKED_WEIGHT_MAPPING

    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ModelConfig:
        return ModelConfig.from_hf(raw, cls.architecture)

    @classmethod
    def attention_needs(cls) -> frozenset[str]:
        """The attention-backend capability flags this architecture's layers rely on."""
        return frozenset({"supports_sinks"}) if cls.attention_sinks else frozenset()

    def make_mlp(self, config: ModelConfig, layer: int, tp: TensorParallel) -> nn.Module | None:
        """Layer ``layer``'s feed-forward block; None: the gated MLP."""
        return None

    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, tp: TensorParallel = SINGLE
    ) -> None:
        super().__init__()
        self.config = config
        self.model = DenseModel(
            config,
            backend,
            tp,
            self.qk_norm,
            lambda layer: self.make_mlp(config, layer, tp),
            self.attention_sinks,
            self.norm_in_fp32,
        )
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_cache, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits of ``hidden``'s rows; under tensor parallelism on the first rank only."""
        return self.lm_head.compute_logits(hidden)

    def keep_hidden_states(self, store: HiddenStateStore) -> None:
        """From now on every forward pass writes the rows ``store`` asks for at its slots
        (set before CUDA graphs are captured, so that replays write them too)."""
        bad = [i for i in store.layers if not 0 <= i < self.config.num_layers]
        if bad:
            raise ValueError(
                f"hidden states of layers {bad} asked for, but the target has "
                f"{self.config.num_layers} layers"
            )
        self.model.hidden_store = store
