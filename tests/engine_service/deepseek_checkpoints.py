"""Small random DeepSeek-V3 checkpoints for the tests and the GPU checks: no fixtures and
no services imported here, so that ``bench/deepseek_gpu_check.py`` runs where only torch and
transformers are installed."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    kv_lora_rank=32,
    q_lora_rank=48,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    max_position_embeddings=512,
    initializer_range=0.15,
    eos_token_id=2,
    bos_token_id=1,
    num_mtp_layers=0,
    # YaRN as DeepSeek-V3 ships it, stretched enough to change the frequencies in use.
    rope_parameters=dict(
        rope_type="yarn",
        rope_theta=10000.0,
        factor=4.0,
        original_max_position_embeddings=128,
        beta_fast=32,
        beta_slow=1,
        mscale=1.0,
        mscale_all_dim=0.8,
    ),
)


def make_deepseek_checkpoint(path: Path, **overrides) -> transformers.DeepseekV3ForCausalLM:
    """A random DeepSeek-V3 (one dense layer, two MoE layers) saved to ``path`` in fp32, with
    random routing biases and norms so that a skipped bias or norm changes the output."""
    config = transformers.DeepseekV3Config(**{**TINY, **overrides})
    torch.manual_seed(4321)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.kv_a_layernorm.weight.uniform_(0.5, 1.5)
            if attn.q_a_layernorm is not None:
                attn.q_a_layernorm.weight.uniform_(0.5, 1.5)
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0, 0.3)
                layer.mlp.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    model.save_pretrained(path)
    return model


def write_mtp_checkpoint(path: Path) -> None:
    make_deepseek_checkpoint(path, num_hidden_layers=1, first_k_dense_replace=0, num_mtp_layers=1)
    # The saved tensors, in the checkpoint layout (per-expert weights).
    state = load_file(str(path / "model.safetensors"))
    embed = state["model.embed_tokens.weight"]
    embed /= embed.pow(2).mean(-1, keepdim=True).sqrt()
    hidden = embed.shape[1]
    mtp = {
        name.replace("model.layers.0.", "model.layers.1."): t.clone()
        for name, t in state.items()
        if name.startswith("model.layers.0.")
    }
    torch.manual_seed(5)
    mtp.update(
        {
            "model.layers.1.enorm.weight": torch.ones(hidden),
            "model.layers.1.hnorm.weight": torch.rand(hidden) + 0.5,
            # Mostly the token, a little of the target's hidden state.
            "model.layers.1.eh_proj.weight": torch.cat(
                (torch.eye(hidden), 0.05 * torch.eye(hidden)), dim=1
            ),
            "model.layers.1.shared_head.norm.weight": state["model.norm.weight"].clone(),
            "model.layers.1.shared_head.head.weight": state["lm_head.weight"].clone(),
            # Real checkpoints carry a copy of the embedding too; it is the target's own.
            "model.layers.1.embed_tokens.weight": embed.clone(),
        }
    )
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in mtp.items()}, str(path / "model-mtp.safetensors"))
