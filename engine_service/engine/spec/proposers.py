"""Proposers: where draft tokens come from. Each fills the draft slots the scheduler reserved.

Contract: :meth:`Proposer.propose` gets the scheduled batch and returns, per sequence index
with ``draft_room > 0``, at most that many tokens that continue the sequence's known tokens;
fewer (or none) is fine. It must not change the batch or any request: the engine places the
drafts and the target model verifies them, so a proposer can only make steps faster or
slower, never change an output.
"""

from __future__ import annotations

import abc
import logging

import numpy as np
import torch

from engine_service.engine.batch import ScheduledBatch, ScheduledSequence
from engine_service.engine.config import EngineConfig
from engine_service.engine.model_runner import ModelRunner
from engine_service.engine.request import Request
from engine_service.engine.spec.config import SpeculativeConfig, check_same_tokenizer
from engine_service.layers.paged_attention import AttentionBackend
from engine_service.models.config import ModelConfig
from engine_service.models.loader import load_model, resolve_model_path

logger = logging.getLogger(__name__)


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

    def __init__(self, runner: ModelRunner, num_tokens: int, max_tokens: int) -> None:
        self.runner = runner  # a ModelRunner over the draft model and its cache
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens  # the most tokens one draft forward takes
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
            passes: list[tuple[ScheduledBatch, list[int]]] = []
            draft_batch, members = ScheduledBatch(), []
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
                # Catching up on prompts can exceed one forward's buffers: split the round.
                if members and draft_batch.num_tokens + sequence.num_tokens > self.max_tokens:
                    passes.append((draft_batch, members))
                    draft_batch, members = ScheduledBatch(), []
                draft_batch.sequences.append(sequence)
                draft_batch.num_tokens += sequence.num_tokens
                draft_batch.num_logits += 1
                members.append(i)
            passes.append((draft_batch, members))
            for draft_batch, members in passes:
                inputs = self.runner.prepare(draft_batch)
                logits = self.runner.execute(draft_batch, inputs)
                for i, token in zip(members, logits.argmax(dim=-1).tolist()):
                    drafts[i].append(token)
        self._seen = {k: v for k, v in self._seen.items() if not v[0].is_finished}
        for (_, seq), step in zip(chosen, steps):
            self._seen[id(seq.request)] = (seq.request, seq.request.num_preemptions, step.known)
        return drafts


class _DraftStep:
    __slots__ = ("fed", "known", "request")

    def __init__(self, request: Request, fed: int, known: int) -> None:
        self.request, self.fed, self.known = request, fed, known


def build_proposer(
    spec: SpeculativeConfig,
    config: EngineConfig,
    target: ModelConfig,
    backend: AttentionBackend,
    num_blocks: int,
    max_model_len: int,
) -> Proposer:
    """The proposer ``spec`` names. A draft model is checked against the target's tokenizer
    and gets a cache of its own over the target pool's block ids (plus the scratch block)."""
    if spec.method == "ngram":
        return NgramProposer(
            spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max
        )
    assert spec.model is not None
    device = torch.device(config.device)
    draft, draft_config, dtype = load_model(spec.model, backend, config.dtype, device, None)
    check_same_tokenizer(
        resolve_model_path(config.model, config.revision),
        resolve_model_path(spec.model),
        target.vocab_size,
        draft_config.vocab_size,
    )
    mc = draft_config
    cache = torch.zeros(
        (num_blocks + 1, mc.num_layers, 2, config.block_size, mc.num_kv_heads, mc.head_dim),
        dtype=dtype,
        device=device,
    )
    # A sequence's first proposal feeds the draft its whole prompt in one pass.
    max_tokens = max(config.max_num_batched_tokens, max_model_len)
    runner = ModelRunner(
        draft,
        backend,
        cache,
        config.block_size,
        max_num_tokens=max_tokens,
        max_num_seqs=config.max_num_seqs,
        max_blocks_per_seq=-(-max_model_len // config.block_size),
        scratch_block=num_blocks,
    )
    logger.info(
        "speculative decoding: draft model %s, %d tokens", spec.model, spec.num_speculative_tokens
    )
    return DraftModelProposer(runner, spec.num_speculative_tokens, max_tokens)
