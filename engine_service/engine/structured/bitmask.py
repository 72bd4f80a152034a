"""Token bitmasks on the host (filled by the grammar backends) and on the device (applied)."""

from __future__ import annotations

import torch


def allocate_bitmask(num_rows: int, vocab_size: int, pin_memory: bool) -> torch.Tensor:
    """An all-allowed int32 ``[num_rows, ceil(vocab_size / 32)]`` host bitmask."""
    shape = (num_rows, (vocab_size + 31) // 32)
    return torch.full(shape, -1, dtype=torch.int32, pin_memory=pin_memory)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` with every token the bitmask forbids set to ``-inf`` (on logits' device).

    Bit ``t % 32`` of word ``t // 32`` allows token ``t``; the arithmetic shift of a negative
    word keeps its sign bits, and ``& 1`` reads the one we want either way.
    """
    num_rows, vocab = logits.shape
    words = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((words[:, :, None] >> shifts) & 1).bool().reshape(num_rows, -1)[:, :vocab]
    return logits.masked_fill(~allowed, float("-inf"))
