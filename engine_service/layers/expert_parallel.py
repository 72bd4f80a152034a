"""Expert parallelism: each rank holds whole experts, and tokens travel to their experts.

With ``--enable-expert-parallel`` the ``E`` experts of a MoE layer are shared out over the
``P`` ranks (data-parallel x tensor-parallel, as in vLLM): rank ``r`` holds a contiguous
range of them, the first ``E % P`` ranks one more than the rest. The ranks of a
tensor-parallel group hold the same tokens after attention, so each takes its own share of
them through the layer and the shares are gathered within that group at the end. Ranks of
different data-parallel ranks hold different batches (data-parallel attention): their
token counts differ, down to zero, and nothing is gathered across them::

    tokens [T, H] (same on every rank of a tensor-parallel group; T differs between groups)
      │ rank r keeps rows [lo_r, hi_r) of its group's tokens  (its share, ~T/TP tokens)
      │ route: (token, expert) pairs, sorted by the rank that owns the expert
      ├─ all-to-all counts over all P ranks (one exchange for both micro-batches)
      ├─ micro-batch 0: dispatch ──▶ experts ──▶ combine ─┐
      │  micro-batch 1:    dispatch ──▶ experts ──▶ combine ─┐   dispatch 1 runs under
      │                                                   │  │   experts 0, combine 0
      │ weighted sum of each token's returned rows  ◀─────┴──┘   under experts 1
      └ all-gather the shares within the tensor-parallel group ──▶ [T, H]

A pair travels once per (token, expert), its router weight staying at home and applied when
its row comes back. The two micro-batches are DeepSeek's inference overlap: their
collectives are asynchronous (NCCL runs them on its own stream), so one micro-batch's
tokens are on the wire while the other's experts compute. On gloo the same calls run on
gloo's threads; there it is for correctness, not speed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

# compute(rows [N, H], local expert ids [N]) -> [N, H]: the experts of this rank on the
# rows it received.
ExpertCompute = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def expert_ranges(num_experts: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of the experts each rank holds."""
    base, extra = divmod(num_experts, size)
    ranges, start = [], 0
    for rank in range(size):
        count = base + (rank < extra)
        ranges.append((start, start + count))
        start += count
    return ranges


def _shares(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges splitting ``range(total)`` as evenly as possible."""
    return expert_ranges(total, parts)


@dataclass(slots=True)
class _MicroBatch:
    """One micro-batch's pairs on this rank, sorted by destination rank."""

    tokens: torch.Tensor  # [N] row in the share, per pair
    weights: torch.Tensor  # [N] router weight, per pair
    experts: torch.Tensor  # [N] expert id (global numbering), per pair
    dest_counts: torch.Tensor  # [P] pairs bound for each rank
    send_counts: list[int] = field(default_factory=list)
    recv_counts: list[int] = field(default_factory=list)
    rows: torch.Tensor | None = None  # received rows
    local_ids: torch.Tensor | None = None  # received expert ids (this rank's numbering)
    pending: list[Any] = field(default_factory=list)  # async work to wait for
    returned: torch.Tensor | None = None  # combined rows, in send order


class ExpertParallel:
    """This rank's experts and the token exchange of one engine's expert-parallel group.

    ``overlap`` splits each layer's tokens in two micro-batches whose communication and
    compute overlap; without it one batch goes through dispatch, experts and combine in turn.

    ``share_rank`` / ``share_size`` / ``share_group``: the ranks that hold the same tokens
    (this rank's tensor-parallel group) and its place among them; by default the whole
    expert-parallel group (tensor parallelism alone). With ``share_size < size`` the
    groups' batches differ (data-parallel attention) and may be empty.
    """

    def __init__(
        self,
        rank: int,
        size: int,
        num_experts: int,
        group: Any = None,
        overlap: bool = True,
        *,
        share_rank: int | None = None,
        share_size: int | None = None,
        share_group: Any = None,
    ) -> None:
        if num_experts < size:
            raise ValueError(
                f"{num_experts} experts cannot be shared out over {size} expert-parallel ranks"
            )
        self.rank, self.size, self.group, self.overlap = rank, size, group, overlap
        if share_size is None:
            share_rank, share_size, share_group = rank, size, group
        if size % share_size or not 0 <= share_rank < share_size:
            raise ValueError(
                f"token-sharing rank {share_rank} of {share_size} does not fit {size} "
                "expert-parallel ranks"
            )
        self.share_rank, self.share_size, self.share_group = share_rank, share_size, share_group
        self.ranges = expert_ranges(num_experts, size)
        self.start, self.end = self.ranges[rank]
        self.num_local = self.end - self.start
        owner = [r for r, (lo, hi) in enumerate(self.ranges) for _ in range(lo, hi)]
        first = [lo for lo, hi in self.ranges for _ in range(lo, hi)]
        # Explicitly on the CPU: models are built under a meta-device context.
        cpu = torch.device("cpu")
        owner_t = torch.tensor(owner, dtype=torch.int64, device=cpu)
        first_t = torch.tensor(first, dtype=torch.int64, device=cpu)
        self._tables = {cpu: (owner_t, first_t)}

    def holds(self, expert: int) -> bool:
        return self.start <= expert < self.end

    def _owner_first(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per expert: the rank holding it, and that rank's first expert (on ``device``)."""
        if device not in self._tables:
            owner, first = self._tables[torch.device("cpu")]
            self._tables[device] = (owner.to(device), first.to(device))
        return self._tables[device]

    # -- the layer's forward --------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        ids: torch.Tensor,
        compute: ExpertCompute,
    ) -> torch.Tensor:
        """``sum_j weights[t, j] * expert_{ids[t, j]}(x[t])`` for every token ``t``, with the
        experts spread over the ranks; ``x``, ``weights``, ``ids`` are the same on every
        rank of the token-sharing group (and ``T`` may differ, down to 0, between groups).
        Returns ``[T, H]``."""
        lo, hi = _shares(x.shape[0], self.share_size)[self.share_rank]
        share = x[lo:hi]
        # Every rank must make the same number of exchanges. When all ranks hold the same
        # tokens the count of micro-batches follows the whole batch, not this rank's share
        # (which may be empty); when the batches differ it cannot follow either, so it is
        # fixed (a micro-batch may be empty).
        if self.share_size < self.size:
            micro_batches = 2 if self.overlap else 1
        else:
            micro_batches = 2 if self.overlap and x.shape[0] >= 2 else 1
        splits = _shares(hi - lo, micro_batches)
        batches = [
            self._pairs(weights[lo + a : lo + b], ids[lo + a : lo + b], a) for a, b in splits
        ]
        self._exchange_counts(batches)
        for mb in batches:  # both micro-batches' tokens go on the wire now
            self._dispatch(mb, share)
        for mb in batches:  # experts of one while the other's rows travel
            for work in mb.pending:
                work.wait()
            # No row for this rank's experts: nothing to run (kernels need a row).
            out = compute(mb.rows, mb.local_ids) if mb.rows.shape[0] else mb.rows
            mb.returned = torch.empty(
                (sum(mb.send_counts), x.shape[1]), dtype=out.dtype, device=out.device
            )
            mb.pending = [
                dist.all_to_all_single(
                    mb.returned,
                    out,
                    mb.send_counts,
                    mb.recv_counts,
                    group=self.group,
                    async_op=True,
                )
            ]
        result = torch.zeros_like(share)
        for mb in batches:
            for work in mb.pending:
                work.wait()
            weighted = mb.returned * mb.weights.to(mb.returned.dtype).unsqueeze(-1)
            result.index_add_(0, mb.tokens, weighted)
        return self._gather_shares(result, x.shape[0])

    def _pairs(self, weights: torch.Tensor, ids: torch.Tensor, offset: int) -> _MicroBatch:
        """The micro-batch's (token, expert) pairs, in destination-rank order."""
        owner, _ = self._owner_first(ids.device)
        flat_ids = ids.flatten()
        order = torch.argsort(owner[flat_ids], stable=True)
        experts = flat_ids[order]
        return _MicroBatch(
            tokens=order // ids.shape[1] + offset,
            weights=weights.flatten()[order],
            experts=experts,
            dest_counts=torch.bincount(owner[experts], minlength=self.size),
        )

    def _exchange_counts(self, batches: list[_MicroBatch]) -> None:
        """Every rank learns how many rows it receives from each other (both micro-batches
        at once: one small exchange, and the only host sync of the layer)."""
        counts = torch.stack([mb.dest_counts for mb in batches], dim=1)  # [P, M]
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts.contiguous(), group=self.group)
        send, recv = counts.T.tolist(), received.T.tolist()
        for m, mb in enumerate(batches):
            mb.send_counts, mb.recv_counts = send[m], recv[m]

    def _dispatch(self, mb: _MicroBatch, share: torch.Tensor) -> None:
        """Start sending the micro-batch's rows and expert ids to their ranks."""
        rows = share.index_select(0, mb.tokens)
        _, first = self._owner_first(mb.experts.device)
        local = mb.experts - first[mb.experts]
        total = sum(mb.recv_counts)
        mb.rows = torch.empty((total, share.shape[1]), dtype=share.dtype, device=share.device)
        mb.local_ids = torch.empty(total, dtype=torch.int64, device=share.device)
        mb.pending = [
            dist.all_to_all_single(
                mb.rows, rows, mb.recv_counts, mb.send_counts, group=self.group, async_op=True
            ),
            dist.all_to_all_single(
                mb.local_ids,
                local,
                mb.recv_counts,
                mb.send_counts,
                group=self.group,
                async_op=True,
            ),
        ]

    def _gather_shares(self, result: torch.Tensor, total: int) -> torch.Tensor:
        """Every share of the token-sharing group side by side again: ``[T, H]``."""
        if self.share_size == 1:
            return result
        shares = _shares(total, self.share_size)
        longest = max(hi - lo for lo, hi in shares)
        padded = torch.zeros((longest, result.shape[1]), dtype=result.dtype, device=result.device)
        padded[: result.shape[0]] = result
        gathered = torch.empty(
            (self.share_size * longest, result.shape[1]), dtype=result.dtype, device=result.device
        )
        dist.all_gather_single(gathered, padded, group=self.share_group)
        pieces = [
            gathered[r * longest : r * longest + (hi - lo)] for r, (lo, hi) in enumerate(shares)
        ]
        return torch.cat(pieces)
