"""The model shape as our layers need it, read from a Hugging Face ``config.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class MoEConfig:
    """The mixture-of-experts part of a model: which layers route, and how.

    ``sparse_layers[i]`` says whether layer ``i`` has routed experts (else a dense MLP of
    the model's ``intermediate_size``). ``shared_expert_intermediate_size`` > 0 adds an
    always-on expert (Qwen2-MoE), scaled by a sigmoid gate when ``shared_expert_gate``.
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool
    sparse_layers: list[bool]
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False


@dataclass(slots=True)
class ModelConfig:
    """One decoder-only transformer's hyper-parameters, family quirks included as flags."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Per layer: None for full attention, else the number of most recent keys attended to.
    sliding_windows: list[int | None] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None
    # Multimodal rotary sections (Qwen2-VL's M-RoPE); None for 1-D rotary positions.
    mrope_section: list[int] | None = None
    # A vision-language checkpoint's whole config.json (defaults filled in), for its vision
    # tower and projector; None for a text-only model.
    multimodal: dict[str, Any] | None = None
    # Routed experts (Mixtral, Qwen MoE, gpt-oss); None for dense models.
    moe: MoEConfig | None = None

    @classmethod
    def from_hf(cls, raw: dict[str, Any], architecture: str) -> ModelConfig:
        """Common fields; a family's ``parse_config`` adjusts its own afterwards."""
        num_heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        rope_params = dict(raw.get("rope_parameters") or {})
        rope_theta = raw.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = raw.get("rope_scaling") or rope_params or None
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            rope_scaling = None if kind == "default" else {**rope_scaling, "rope_type": kind}
        num_layers = raw["num_hidden_layers"]
        eos = raw.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            architecture=architecture,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or hidden // num_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            hidden_act=raw.get("hidden_act", "silu"),
            qkv_bias=bool(raw.get("attention_bias", False)),
            o_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            sliding_windows=[None] * num_layers,
            eos_token_ids=eos_ids,
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        )

    def kv_block_shape(self, block_size: int) -> tuple[int, ...]:
        """One KV cache block's shape, ``(num_layers, planes, block_size, heads, width)``:
        keys and values of every KV head here; a family that caches something else per token
        (DeepSeek's compressed latent) overrides it. Everything that allocates, sizes, moves or
        fingerprints blocks asks this, so the pool, offload, the KV service and KV events
        follow the model."""
        return (self.num_layers, 2, block_size, self.num_kv_heads, self.head_dim)

    def set_windows_from_layer_types(self, raw: dict[str, Any]) -> None:
        """Qwen-style configs name each layer's kind in ``layer_types``."""
        window = raw.get("sliding_window")
        layer_types = raw.get("layer_types")
        if window is None or not raw.get("use_sliding_window", layer_types is not None):
            return
        if layer_types is None:
            first = raw.get("max_window_layers", 0)
            layer_types = [
                "sliding_attention" if i >= first else "full_attention"
                for i in range(self.num_layers)
            ]
        self.sliding_windows = [
            window if kind == "sliding_attention" else None for kind in layer_types
        ]
