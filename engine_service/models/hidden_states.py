"""The target's hidden states, kept per KV slot for a proposer that drafts from them (EAGLE).

A feature-level proposer reads, for every token the target has computed, one feature row:
EAGLE-1 the final normed hidden state, EAGLE-3 the residual stream entering three chosen
layers, concatenated. The target writes those rows during its own forward pass, at the
step's slot mapping, exactly where it writes the token's K/V::

    states [num_blocks + 1, block_size, width]      (the last block: scratch, as in the KV pool)
    slot s = block * block_size + offset  ──▶  states.view(-1, width)[s]

so the rows need no bookkeeping of their own: they follow a request's block table, stay
valid in prefix-cached blocks (same tokens, same states), are rewritten when a preempted
request recomputes, and follow block copies and accepted tree paths' slot moves (the model
runner applies both to this tensor as to the KV cache). A rejected draft's row is garbage
past the request's computed tokens, which no reader looks at. Rows of blocks restored from
an offload tier or another engine are not carried along: the proposer then drafts from
stale features, which costs acceptance, never correctness.
"""

from __future__ import annotations

import torch


class HiddenStateStore:
    """Feature rows per KV slot. ``layers``: the decoder layers whose *input* (the residual
    stream after the layers before) is kept, in this order; ``final``: whether the final
    normed output is kept (after those)."""

    def __init__(
        self,
        layers: tuple[int, ...],
        final: bool,
        hidden_size: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layers = layers
        self.final = final
        self.width = hidden_size * (len(layers) + int(final))
        self.states = torch.zeros(
            (num_blocks + 1, block_size, self.width), dtype=dtype, device=device
        )
        self._flat = self.states.view(-1, self.width)

    def write(self, captured: list[torch.Tensor], slot_mapping: torch.Tensor) -> None:
        """Store a forward pass's captured rows (one tensor ``[T, hidden]`` each, in the
        store's order) at the step's slots. No host sync: graph-capturable."""
        self._flat.index_copy_(0, slot_mapping, torch.cat(captured, dim=-1).to(self._flat.dtype))

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """Feature rows ``[len(slots), width]``."""
        return self._flat.index_select(0, slots)
