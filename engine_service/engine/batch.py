"""The step contract: what the scheduler hands the model runner, and what comes back.

A :class:`ScheduledBatch` is the runner's only input. Each :class:`ScheduledSequence` says
which of a sequence's tokens run this step and which of its rows produce logits::

    request.all_token_ids  [ computed (KV cached) | known, not computed | ]  + draft tokens
    query rows this step           [start ........................ start + num_tokens)
                                    └ known tokens ┘└ draft_token_ids ┘
    logits rows                                     the last ``num_logits`` query rows

A prefill chunk that stops short of the sequence's end has ``num_logits == 0``; a step that
reaches the end has 1; verifying ``k`` draft tokens has ``k + 1``. After the forward pass the
sampler produces tokens for the :attr:`ScheduledBatch.sample_rows` and
:meth:`Scheduler.update <engine_service.engine.scheduler.Scheduler.update>` commits them:
nothing else writes a request's progress.

Fields for later capabilities are carried end to end already: ``adapter_slot`` (multi-LoRA:
the adapter of every token of the sequence), ``mm_spans`` (multimodal embeddings to splice in
this chunk), ``custom_mask`` and ``position_offsets`` (a token tree to verify).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine_service.engine.request import Request


@dataclass(slots=True)
class ScheduledSequence:
    """One sequence in a step: query tokens at cache indices ``[start, start + num_tokens)``."""

    request: Request
    start: int
    num_tokens: int
    num_logits: int
    draft_token_ids: list[int] = field(default_factory=list)
    # Which adapter slot the sequence's tokens use (0: none).
    adapter_slot: int = 0
    # Multimodal spans (placeholder ranges with their embeddings) inside this chunk.
    mm_spans: list[Any] = field(default_factory=list)
    # A token tree: the [num_tokens, num_tokens] mask among the query tokens, and each
    # query token's rotary position minus its cache index (depth-based positions).
    custom_mask: torch.Tensor | None = None
    position_offsets: list[int] | None = None
    # The tokens of this step whose ids are not known yet: the newest token is still being
    # sampled by the step in flight (overlapped scheduling). Its id comes from that step's
    # device tensor, row ``pending_row``.
    pending_row: int = -1
    # The request's preemption count when scheduled: a sequence preempted while this step
    # was in flight must not have its progress committed by this step.
    epoch: int = 0
    # Slots reserved for draft tokens a proposer may fill (speculative decoding).
    draft_room: int = 0
    # A token tree instead of a chain: each draft's parent (0 is the sequence's newest known
    # token, i is draft i), and after verification the drafts on the accepted path.
    draft_parents: list[int] | None = None
    accepted_path: list[int] = field(default_factory=list)
    # A token tree whose shape stays on the device (the batch's DeviceDrafts holds its
    # parents, depths and ancestor masks): no host parents, mask or offsets.
    device_tree: bool = False

    @property
    def is_tree(self) -> bool:
        return self.draft_parents is not None or self.device_tree

    @property
    def num_known_tokens(self) -> int:
        return self.num_tokens - len(self.draft_token_ids)


@dataclass(slots=True)
class DeviceDrafts:
    """Drafts a proposer made on the device and did not read back: sequence ``seqs[r]``'s
    drafts are ``tokens[r, :lengths[r]]``. Placed in a batch, the sequences carry
    placeholders (``draft_token_ids`` of the right length); the step's input ids and the
    verification take the tokens from ``tokens``, and the verification's read-back brings
    the accepted ones to the host.

    Chains, or token trees of one full size (every length ``W``) with their shape: draft
    ``m`` (1-based, column ``m - 1``) hangs under ``parents[r, m - 1]`` (0: the newest known
    token), ``depths[r, m - 1]`` deep (the root's children: 1), and sees the drafts
    ``ancestors[r, m - 1]`` marks (its path, itself included). The step's tree mask and
    depth positions are built from them on the device, and so is the verification's walk."""

    seqs: list[int]
    tokens: torch.Tensor  # [R, max(lengths)], on the device
    lengths: list[int]
    parents: torch.Tensor | None = None  # [R, W] int64 (trees only)
    depths: torch.Tensor | None = None  # [R, W] int64
    ancestors: torch.Tensor | None = None  # [R, W, W] bool

    def to_host(self) -> dict[int, list[int]]:
        """The drafts as host lists (a read-back; for callers that need the tokens)."""
        rows = self.tokens.tolist()
        return {i: row[:n] for i, row, n in zip(self.seqs, rows, self.lengths, strict=True)}

    def parents_to_host(self) -> dict[int, list[int]]:
        """Trees: each one's parents as a host list (a read-back); chains: none."""
        if self.parents is None:
            return {}
        return dict(zip(self.seqs, self.parents.tolist(), strict=True))

    def tree_masks(self) -> torch.Tensor:
        """``[R, W + 1, W + 1]`` bool: each tree's attention mask over its newest known
        token (row and column 0) and its drafts, as :func:`tree_mask` builds it on the host."""
        assert self.ancestors is not None
        num, width = self.tokens.shape
        mask = torch.zeros(num, width + 1, width + 1, dtype=torch.bool, device=self.tokens.device)
        mask[:, :, 0] = True
        mask[:, 1:, 1:] = self.ancestors
        return mask


@dataclass(slots=True)
class ScheduledBatch:
    """Everything about one step: its sequences, block copies to do first, who was preempted.

    ``sample_rows`` lists, for every sample to draw, (the logits row it draws from, the
    request it extends): a prompt finishing with pending forks (``n > 1``) feeds its one row
    to each of its samples. Logits rows are numbered over the batch in sequence order.
    """

    sequences: list[ScheduledSequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    sample_rows: list[tuple[int, Request]] = field(default_factory=list)
    # The sequence (index into ``sequences``) each sample row belongs to.
    sample_seqs: list[int] = field(default_factory=list)
    num_tokens: int = 0
    num_logits: int = 0
    # Drafts still on the device (their sequences' draft_token_ids are placeholders).
    device_drafts: DeviceDrafts | None = None
    # Token trees under a batch budget: the nodes the scheduler reserved for each of this
    # step's trees (the proposer grows them to this size); 0: the proposer's own sizing.
    tree_size: int = 0

    def __bool__(self) -> bool:
        return bool(self.sequences)

    @property
    def has_drafts(self) -> bool:
        return any(s.draft_token_ids for s in self.sequences)

    def place_drafts(
        self,
        drafts: dict[int, list[int]] | DeviceDrafts,
        parents: dict[int, list[int]] | None = None,
    ) -> None:
        """Put proposed tokens (``drafts[sequence index]``, at most its ``draft_room``) into
        the step, then renumber token counts and logits rows: a sequence verifying ``d``
        drafts has ``d + 1`` logits rows, and its sample row points at the first. Drafts
        still on the device (:class:`DeviceDrafts`, within the draft room) go in as
        placeholders; trees among them keep their shape there (``device_tree``).

        ``parents[sequence index]`` makes the drafts a token tree (draft ``i``'s parent, 0
        for the newest known token): the step then carries the tree's attention mask and
        depth-based positions, as the attention contract defines them."""
        on_device_trees: set[int] = set()
        if isinstance(drafts, DeviceDrafts):
            self.device_drafts = drafts
            if drafts.parents is not None:
                on_device_trees = set(drafts.seqs)
            drafts = {i: [0] * n for i, n in zip(drafts.seqs, drafts.lengths, strict=True)}
        for index, tokens in drafts.items():
            seq = self.sequences[index]
            tokens = tokens[: seq.draft_room]
            known = seq.num_known_tokens
            seq.draft_token_ids = list(tokens)
            seq.num_tokens = known + len(tokens)
            seq.num_logits = 1 + len(tokens)
            tree = (parents or {}).get(index)
            seq.device_tree = index in on_device_trees
            if seq.device_tree:
                # Its shape is on the device, whole: one known token, then every draft.
                assert known == 1 and len(tokens) == len(drafts[index])
                seq.draft_parents = seq.custom_mask = seq.position_offsets = None
            elif tree is not None and tree != list(range(len(tokens))):
                seq.draft_parents = tree[: len(tokens)]
                seq.custom_mask, depths = tree_mask(seq.draft_parents)
                seq.position_offsets = [0] * (known - 1) + [d - i for i, d in enumerate(depths)]
            else:
                seq.draft_parents = seq.custom_mask = seq.position_offsets = None
        self.num_tokens = sum(s.num_tokens for s in self.sequences)
        first_rows, row = [], 0
        for seq in self.sequences:
            first_rows.append(row)
            row += seq.num_logits
        self.num_logits = row
        self.sample_rows = [
            (first_rows[index], request)
            for index, (_, request) in zip(self.sample_seqs, self.sample_rows)
        ]


def tree_mask(parents: list[int]) -> tuple[torch.Tensor, list[int]]:
    """The ``[n + 1, n + 1]`` mask of a token tree whose node 0 is the root and node ``i``
    (1-based) hangs under ``parents[i - 1]``: each node sees its ancestors and itself. Also
    each node's depth (root 0). Trees of one shape share their mask (read it, never write
    it): a proposer's trees take few shapes, so most rounds build none."""
    mask, depths = _tree_mask(tuple(parents))
    return mask, list(depths)


@functools.lru_cache(maxsize=4096)
def _tree_mask(parents: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    size = len(parents) + 1
    mask = np.zeros((size, size), dtype=bool)  # built in numpy: a torch op per row is slow
    depths = [0] * size
    mask[0, 0] = True
    for node in range(1, size):
        parent = parents[node - 1]
        if not 0 <= parent < node:
            raise ValueError(f"draft {node}'s parent {parent} does not come before it")
        mask[node] = mask[parent]
        mask[node, node] = True
        depths[node] = depths[parent] + 1
    return torch.from_numpy(mask), tuple(depths)


@dataclass(slots=True)
class SampledTokens:
    """What the sampler returns for a batch: one token (and optional logprob) per sample row.

    ``token_ids`` stays on the device for the next overlapped step to read; ``token_list``
    and ``logprobs`` are the host copies :meth:`Scheduler.update` commits.
    """

    token_ids: torch.Tensor
    token_list: list[int]
    logprobs: list[Any]
    # Per sample row, the tokens to commit when the step verified drafts (accepted drafts
    # then one more); None when every row commits its one sampled token.
    token_lists: list[list[int]] | None = None
    logprob_lists: list[list[Any]] | None = None
    # Whether the accepted tree paths' KV was packed on the device already (one rank holds
    # the KV); otherwise the scheduler queues the moves for the model runner.
    paths_moved: bool = False
