"""Proposers: where draft tokens come from. Each fills the draft slots the scheduler reserved.

Contract: :meth:`Proposer.propose` gets the scheduled batch and returns, per sequence index
with ``draft_room > 0``, at most that many tokens that continue the sequence's known tokens;
fewer (or none) is fine. It must not change the batch or any request: the engine places the
drafts and the target model verifies them, so a proposer can only make steps faster or
slower, never change an output.
"""

from __future__ import annotations

import abc

import numpy as np
import torch

from engine_service.engine.batch import ScheduledBatch, ScheduledSequence
from engine_service.engine.request import Request


class Proposer(abc.ABC):
    @abc.abstractmethod
    def propose(self, batch: ScheduledBatch) -> dict[int, list[int]]: ...

    def close(self) -> None:
        return None


class NgramProposer(Proposer):
    """Prompt lookup: find the sequence's last ``n`` tokens earlier in it (longest ``n``
    from ``prompt_lookup_max`` down to ``prompt_lookup_min``, most recent match) and propose
    what followed there. Free to compute, and strong where outputs repeat their input (code
    edits, extraction, summaries that quote)."""

    def __init__(self, num_tokens: int, lookup_min: int, lookup_max: int) -> None:
        self.num_tokens = num_tokens
        self.lookup_min = lookup_min
        self.lookup_max = lookup_max

    def propose(self, batch: ScheduledBatch) -> dict[int, list[int]]:
        drafts = {}
        for index, seq in enumerate(batch.sequences):
            if seq.draft_room:
                found = self.lookup(seq.request.all_token_ids, min(seq.draft_room, self.num_tokens))
                if found:
                    drafts[index] = found
        return drafts

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        seq = np.asarray(tokens, dtype=np.int64)
        length = len(seq)
        for n in range(min(self.lookup_max, length - 1), self.lookup_min - 1, -1):
            tail = seq[length - n :]
            # Every window of n tokens that ends before the tail itself.
            windows = np.lib.stride_tricks.sliding_window_view(seq[: length - 1], n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return seq[start : start + k].tolist()
        return []


class DraftModelProposer(Proposer):
    """A smaller model with the same tokenizer proposes ``k`` tokens greedily, one batched
    forward per token. Its KV lives in a cache tensor of its own, indexed by the target's
    block tables and slots (the same positions), so it needs no block bookkeeping: what a
    rejected draft wrote is overwritten when the position is computed again. Each request
    first feeds the draft the tokens it has not seen (the whole prompt the first time, then
    the tokens accepted since)."""

    def __init__(self, runner, num_tokens: int) -> None:
        self.runner = runner  # a ModelRunner over the draft model and its cache
        self.num_tokens = num_tokens
        # id(request) -> (request, its preemption count, tokens fed to the draft)
        self._seen: dict[int, tuple[Request, int, int]] = {}

    def propose(self, batch: ScheduledBatch) -> dict[int, list[int]]:
        chosen = [(i, s) for i, s in enumerate(batch.sequences) if s.draft_room]
        if not chosen:
            return {}
        rounds = max(min(s.draft_room, self.num_tokens) for _, s in chosen)
        drafts: dict[int, list[int]] = {i: [] for i, _ in chosen}
        # Round 0 feeds each sequence's unseen known tokens; later rounds the newest draft.
        steps = []
        for _, seq in chosen:
            request = seq.request
            seen, epoch, fed = self._seen.get(id(request), (None, -1, 0))
            if seen is not request or epoch != request.num_preemptions:
                fed = 0
            steps.append(_DraftStep(request, fed, request.num_tokens))
        for round_index in range(rounds):
            active = [
                (i, seq, step)
                for (i, seq), step in zip(chosen, steps)
                if round_index < min(seq.draft_room, self.num_tokens)
            ]
            if not active:
                break
            draft_batch = ScheduledBatch()
            for i, seq, step in active:
                if round_index == 0:
                    start, extra = step.fed, []
                    known = step.known - step.fed
                else:
                    start, extra, known = step.known + round_index - 1, [drafts[i][-1]], 0
                sequence = ScheduledSequence(
                    request=seq.request,
                    start=start,
                    num_tokens=known + len(extra),
                    num_logits=1,
                    draft_token_ids=extra,
                )
                draft_batch.sequences.append(sequence)
                draft_batch.num_tokens += sequence.num_tokens
                draft_batch.num_logits += 1
            inputs = self.runner.prepare(draft_batch)
            logits = self.runner.execute(draft_batch, inputs)
            for (i, _, _), token in zip(active, logits.argmax(dim=-1).tolist()):
                drafts[i].append(token)
        self._seen = {k: v for k, v in self._seen.items() if not v[0].is_finished}
        for (_, seq), step in zip(chosen, steps):
            self._seen[id(seq.request)] = (seq.request, seq.request.num_preemptions, step.known)
        return drafts


class _DraftStep:
    __slots__ = ("fed", "known", "request")

    def __init__(self, request: Request, fed: int, known: int) -> None:
        self.request, self.fed, self.known = request, fed, known


def draft_kv_cache(model_config, num_blocks: int, block_size: int, dtype, device) -> torch.Tensor:
    """The draft model's cache: the target pool's block count (plus the scratch block)."""
    mc = model_config
    return torch.zeros(
        (num_blocks + 1, mc.num_layers, 2, block_size, mc.num_kv_heads, mc.head_dim),
        dtype=dtype,
        device=device,
    )
