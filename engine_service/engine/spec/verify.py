"""Verification of proposed tokens against the target model: greedy and rejection sampling.

A sequence that proposed drafts ``d_1 .. d_k`` ran ``k + 1`` logits rows: row ``j`` is the
target's distribution ``p_j`` for the token after ``d_j`` (row 0: after the last known
token). Proposals here are deterministic (n-gram lookup, a draft model's argmax), so the
proposal distribution is one-hot and the speculative-sampling rule of Leviathan et al.
(2023) / Chen et al. (2023) reads:

    accept d_{j+1} with probability min(1, p_j(d_{j+1}) / q_j(d_{j+1})) = p_j(d_{j+1})
    at the first rejection, sample from the residual  norm(max(p_j - q_j, 0))
                                                      = p_j with d_{j+1} removed
    when all k are accepted, sample one more token from p_k

which makes every emitted token distributed exactly as the target alone would draw it.
Greedy rows accept while ``argmax p_j == d_{j+1}`` and emit the argmax at the first
mismatch: token for token the non-speculative output.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from engine_service.engine.batch import ScheduledBatch, tree_mask
from engine_service.engine.outputs import TokenLogprob
from engine_service.engine.sampler import (
    SamplingMetadata,
    apply_penalties,
    processed_probs,
    race,
)
from engine_service.engine.structured import apply_bitmask


@torch.inference_mode()
def verify(
    logits: torch.Tensor,
    batch: ScheduledBatch,
    vocab_size: int,
    generator: torch.Generator,
    grammar_masks: dict[int, torch.Tensor] | None = None,
) -> dict[int, list[int]]:
    """Tokens to commit for every sample row whose sequence verified drafts, by row index
    into ``batch.sample_rows``. ``logits``: fp32 ``[batch.num_logits, vocab]``;
    ``grammar_masks``: per sample row, the bitmask of each verified position
    (:func:`~engine_service.engine.spec.grammar.draft_grammar_masks`)."""
    result: dict[int, list[int]] = {}
    rows: list[tuple[int, object]] = []  # (logits row, request), one per verified position
    spans: list[tuple[int, int, list[int]]] = []  # (sample row, first position, drafts)
    for index, (first, request) in enumerate(batch.sample_rows):
        seq = batch.sequences[batch.sample_seqs[index]]
        if not seq.draft_token_ids:
            continue
        if seq.draft_parents is not None:
            result[index] = _walk_tree(logits, first, seq, (grammar_masks or {}).get(index))
            continue
        spans.append((index, len(rows), seq.draft_token_ids))
        rows.extend((first + j, request) for j in range(len(seq.draft_token_ids) + 1))
    if not spans:
        return result
    meta = SamplingMetadata.build(rows, vocab_size, logits.device)
    device = logits.device
    # The verified positions' own rows (the batch's other rows belong to other sequences).
    logits = logits[torch.tensor([row for row, _ in rows], device=device)]
    if meta.output_counts is not None:
        # Penalties count the output so far: position j also counts drafts 1..j, the tokens
        # it is verified after (the order the plain sampler applies them in: penalties, then
        # the grammar's mask).
        counts = meta.output_counts.clone()
        for _, first, drafts in spans:
            for i, draft in enumerate(drafts):
                counts[first + i + 1 : first + len(drafts) + 1, draft] += 1
        meta = replace(meta, output_counts=counts)
        logits = apply_penalties(logits, meta)
    for index, first, drafts in spans:
        mask = (grammar_masks or {}).get(index)
        span = slice(first, first + len(drafts) + 1)
        if mask is not None:
            logits[span] = apply_bitmask(logits[span], mask)
        request = batch.sample_rows[index][1]
        logits[span] = hold_back_stops(logits[span], request, list(range(len(drafts) + 1)))
    position_drafts = torch.full((len(rows),), -1, dtype=torch.long)
    for _, first, drafts in spans:
        position_drafts[first : first + len(drafts)] = torch.tensor(drafts)
    has_draft = position_drafts >= 0
    draft_ids = position_drafts.clamp(min=0).to(device)

    greedy_tokens = logits.argmax(dim=-1)
    if meta.all_greedy:
        accepted = greedy_tokens == draft_ids
        emitted = greedy_tokens
    else:
        probs = processed_probs(logits, meta)
        p_draft = probs.gather(1, draft_ids[:, None]).squeeze(1)
        uniform = _uniforms(rows, meta, generator, device)
        sampled_accept = uniform < p_draft
        # Residual rows drop the rejected draft; the last row of a span keeps p whole.
        residual = probs.clone()
        drop = torch.nonzero(has_draft).squeeze(1).to(device)
        residual[drop, draft_ids[drop]] = 0.0
        residual_sum = residual.sum(dim=-1, keepdim=True)
        residual = torch.where(residual_sum > 0, residual / residual_sum.clamp_min(1e-30), probs)
        drawn = race(residual, meta, generator)
        accepted = torch.where(meta.greedy, greedy_tokens == draft_ids, sampled_accept)
        emitted = torch.where(meta.greedy, greedy_tokens, drawn)

    accepted_list = accepted.tolist()
    emitted_list = emitted.tolist()
    for index, first, drafts in spans:
        tokens: list[int] = []
        for j, draft in enumerate(drafts):
            if not accepted_list[first + j]:
                break
            tokens.append(draft)
        tokens.append(emitted_list[first + len(tokens)])
        result[index] = tokens
    return result


def hold_back_stops(rows: torch.Tensor, request, offsets: list[int]) -> torch.Tensor:
    """``min_tokens`` on verified positions: row ``i`` chooses the request's output token
    number ``num_output_tokens + offsets[i]``; while that is under ``min_tokens`` its stop
    and EOS tokens cannot be chosen (unless a grammar admits nothing else)."""
    params = request.params
    early = [
        i
        for i, offset in enumerate(offsets)
        if request.num_output_tokens + offset < params.min_tokens
    ]
    if not early:
        return rows
    stops = set(params.stop_token_ids) | (
        set() if params.ignore_eos else set(request.eos_token_ids)
    )
    if not stops:
        return rows
    held = rows.clone()
    index = torch.tensor(early, device=rows.device)
    held[index[:, None], torch.tensor(sorted(stops), device=rows.device)[None, :]] = float("-inf")
    if request.grammar is not None:
        dead = ~torch.isfinite(held).any(dim=-1, keepdim=True)
        held = torch.where(dead, rows, held)
    return held


def _walk_tree(logits: torch.Tensor, first: int, seq, mask: torch.Tensor | None) -> list[int]:
    """Greedy verification of a token tree (trees are drafted for greedy samples only):
    from the root, follow the child whose token is the target's argmax at its parent, and
    emit the argmax where no child matches. Records the accepted drafts on the sequence.

    Row ``first + i`` holds the target's distribution after tree node ``i`` (0: the root)."""
    rows = logits[first : first + len(seq.draft_token_ids) + 1]
    if mask is not None:
        rows = apply_bitmask(rows, mask)
    _, depths = tree_mask(seq.draft_parents)
    rows = hold_back_stops(rows, seq.request, depths)
    best = rows.argmax(dim=-1).tolist()
    children: dict[tuple[int, int], int] = {}
    for node, (parent, token) in enumerate(
        zip(seq.draft_parents, seq.draft_token_ids, strict=True), start=1
    ):
        children.setdefault((parent, token), node)
    node, path = 0, []
    while (node, best[node]) in children:
        node = children[(node, best[node])]
        path.append(node)
    seq.accepted_path = path
    return [seq.draft_token_ids[n - 1] for n in path] + [best[node]]


def _uniforms(rows, meta: SamplingMetadata, generator, device) -> torch.Tensor:
    """One uniform per verified position; a seeded request's from its own generator."""
    uniform = torch.rand(len(rows), generator=generator, device=device)
    seeded = [i for i, (_, r) in enumerate(rows) if r.generator is not None]
    if seeded:
        values = torch.stack([torch.rand((), generator=rows[i][1].generator) for i in seeded])
        uniform[torch.tensor(seeded, device=device)] = values.to(device)
    return uniform


def verified_logprobs(
    logits: torch.Tensor, batch: ScheduledBatch, verified: dict[int, list[int]]
) -> dict[int, list[TokenLogprob]]:
    """The target's own logprobs (unmasked, as the sampler reports them) of every committed
    token of a verified run, for the samples that asked for logprobs: the row a token was
    judged at is its chain position, or in a tree the accepted node before it."""
    out: dict[int, list[TokenLogprob]] = {}
    for index, tokens in verified.items():
        first, request = batch.sample_rows[index]
        k = request.params.logprobs
        if k is None:
            continue
        seq = batch.sequences[batch.sample_seqs[index]]
        if seq.draft_parents is None:
            rows = [first + j for j in range(len(tokens))]
        else:
            rows = [first, *(first + node for node in seq.accepted_path)][: len(tokens)]
        raw = torch.log_softmax(logits[torch.tensor(rows, device=logits.device)], dim=-1)
        chosen = raw.gather(1, torch.tensor(tokens, device=logits.device)[:, None]).squeeze(1)
        top = raw.topk(k, dim=-1) if k else None
        chosen_list = chosen.tolist()
        values = top.values.tolist() if top is not None else None
        ids = top.indices.tolist() if top is not None else None
        out[index] = [
            TokenLogprob(token, chosen_list[j], list(zip(ids[j], values[j])) if ids else [])
            for j, token in enumerate(tokens)
        ]
    return out
