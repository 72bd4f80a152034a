"""The vocabulary split across tensor-parallel ranks: the token embedding and the LM head.

Rank ``r`` of ``n`` holds rows ``[r * per_rank, (r + 1) * per_rank)`` of the vocabulary, with
``per_rank = ceil(vocab / n)``; rows past the real vocabulary are zero padding::

    vocab 10, tp 4 -> per_rank 3:   rank 0: 0 1 2 | rank 1: 3 4 5 | rank 2: 6 7 8 | rank 3: 9 - -

The embedding looks up the tokens of its own range (others read as zero rows) and the ranks'
results are summed; the head computes its range's logits and the first rank gathers them and
drops the padding. With one rank both are the plain ``nn.Embedding`` / linear maths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine_service.layers.linear import ShardId
from engine_service.layers.parallel import SINGLE, TensorParallel


class VocabParallelEmbedding(nn.Module):
    """``weight [per_rank, hidden]``: this rank's rows of the embedding table."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size, self.tp = vocab_size, hidden_size, tp
        self.per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.per_rank
        self.end = min(self.start + self.per_rank, vocab_size)
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None
    ) -> None:
        """Copy this rank's rows of the full ``[vocab, hidden]`` table; zero the padding."""
        if shard_id is not None:
            raise ValueError(f"a vocabulary-parallel table has no shard {shard_id!r}")
        if tuple(loaded.shape) != (self.vocab_size, self.hidden_size):
            raise ValueError(
                f"checkpoint shape {tuple(loaded.shape)} != {(self.vocab_size, self.hidden_size)}"
            )
        rows = max(self.end - self.start, 0)
        param.data.zero_()
        param.data[:rows].copy_(loaded[self.start : self.start + rows])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.start) & (input_ids < self.end)
        local = torch.where(mine, input_ids - self.start, 0)
        hidden = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(hidden)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection over this rank's vocabulary rows; may share its weight with
    the embedding (tied checkpoints)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        raise TypeError("call compute_logits: the head is not applied as a module")

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits ``[T, vocab]`` on the first rank; ``None`` on the others."""
        logits = F.linear(hidden, self.weight)
        if self.tp.size == 1:
            return logits
        gathered = self.tp.gather(logits)
        return gathered[..., : self.vocab_size] if gathered is not None else None
