"""PEFT adapters for the multi-LoRA tests: made with ``peft`` itself, with random non-zero
B matrices (PEFT starts B at zero, which would make any adapter equal the base model)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch


def make_peft_adapter(base: torch.nn.Module, path: Path, seed: int, **config: Any) -> Path:
    """Save a LoRA adapter of ``base`` (a ``transformers`` model, left untouched) to
    ``path``; ``config`` goes to ``peft.LoraConfig`` (``r``, ``lora_alpha``, ...)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    peft_model.save_pretrained(path)
    return path


def merged_model(base: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """``base`` with the adapter in ``folder`` merged into its weights (PEFT's own merge)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), folder).merge_and_unload().eval()


def greedy_reference(model: torch.nn.Module, prompt: list[int], max_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()
