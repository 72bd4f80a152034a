"""Small random-weight checkpoints of every supported family, made with ``transformers``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.15,
    eos_token_id=2,
    bos_token_id=1,
)

FAMILIES = {
    # Llama 3.1-style rope scaling, with factors that change the frequencies in use.
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
            rope_theta=10000.0,
        ),
    ),
    # A window much shorter than the prompts, so that it matters.
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(sliding_window=12),
    ),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict()),
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(head_dim=32, tie_word_embeddings=True),
    ),
    # Top-2 of 8 experts on every layer, with Mistral's window.
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48, sliding_window=12),
    ),
    # A shared expert with its sigmoid gate; layer 1 is dense (mlp_only_layers).
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        transformers.Qwen2MoeForCausalLM,
        dict(
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        ),
    ),
    # q/k norm, top-2 of 8 renormalised, tied embeddings.
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(
            head_dim=32,
            tie_word_embeddings=True,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
        ),
    ),
    # Sinks, sliding (window 12) and full layers alternating, YaRN rope, biased experts.
    "gpt_oss": (
        transformers.GptOssConfig,
        transformers.GptOssForCausalLM,
        dict(
            head_dim=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            intermediate_size=48,
            sliding_window=12,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),
}


def make_checkpoint(path: Path, family: str, **overrides) -> transformers.PreTrainedModel:
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**COMMON, **extra, **overrides})
    torch.manual_seed(1234)
    model = model_cls(config).eval()
    if family in ("qwen2", "qwen2_moe"):
        # Random biases, so that a missing bias would change the output.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0, 0.2)
    if family in ("qwen3", "qwen3_moe"):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    if family == "gpt_oss":
        # Sinks and biases start at zero: random ones, so that ignoring them shows.
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0, 1.0)
                layer.mlp.router.bias.normal_(0, 0.5)
                layer.mlp.experts.gate_up_proj_bias.normal_(0, 0.2)
                layer.mlp.experts.down_proj_bias.normal_(0, 0.2)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def family_checkpoint(request, tmp_path_factory):
    """(family, path, transformers model) for each supported family."""
    path = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    model = make_checkpoint(path, request.param)
    return request.param, path, model
