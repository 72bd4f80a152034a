"""What the benchmarks share: model shapes, random checkpoints of them, device sync."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

# Llama-shaped configurations; the random checkpoints built from them stand in for the real
# models of the same shape (speed depends on the shape, not on the weights).
PRESETS = {
    # Small enough for a 2-core CPU to finish bench/throughput.py's default run in minutes.
    "tiny": dict(
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
        max_position_embeddings=2048,
    ),
    # Big enough that prefill dominates a 1k-token prompt on a CPU (bench/prefix.py).
    "small": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8192,
        max_position_embeddings=8192,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        head_dim=64,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
}


def make_checkpoint(path: Path, preset: str, dtype: torch.dtype, device: str) -> None:
    """A random-weight checkpoint of ``preset``'s shape, built on ``device``."""
    config = transformers.LlamaConfig(**PRESETS[preset], initializer_range=0.02, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    """Wait for queued device work, so that wall-clock times cover it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
