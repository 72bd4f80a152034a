"""Verification of proposed tokens against the target model: chains and trees, greedy and
sampled, by one rule.

A sequence that proposed drafts ran one logits row per node of its draft tree: row
``first + i`` is the target's distribution after node ``i`` (node 0 is the newest known
token; a chain is the tree whose draft ``i`` hangs under ``i - 1``). Each row is processed
as the plain sampler would process it after the path to its node: penalties count the
path's drafts, the grammar's mask is the one after them, ``min_tokens`` holds stops back by
the node's depth, then temperature, top-k, top-p and min-p. Each row then gives one token,
the argmax for greedy requests and one draw for sampled ones, and a walk from the root
follows the child whose token is the one its parent drew, until none is::

    node   0 ─ 1 ─ 3          drawn at 0: the token of 1  ─▶ go to 1
             │   └ 4          drawn at 1: the token of 4  ─▶ go to 4
             └ 2              drawn at 4: x (4 is a leaf)  ─▶ commit tokens(1), tokens(4), x

Why this is lossless. The walk reaches a node through the draws at its ancestors alone,
which are independent of the node's own draw, so every committed token is drawn from the
target's distribution given the tokens committed before it, whatever the tree holds. For
proposals that are deterministic, as ours are (n-gram lookup, a draft's argmax, EAGLE-2's
top-k children), this is the multi-draft speculative-sampling rule of Leviathan et al.
(2023) and SpecInfer (Miao et al. 2024) with one-hot proposals: trying the children in turn,
accepting child ``c`` with probability ``min(1, p(c) / q(c)) = p(c)`` and otherwise going on
against the residual ``norm(max(p - q, 0))`` (``p`` with ``c`` removed), accepts some child
with probability ``sum_c p(c)`` and emits any other ``x`` with probability ``p(x)``: exactly
the draw-and-match above, with one draw per node instead of one uniform per child.

Seeds. A draw is the sampler's race, ``argmax(p / E)`` with ``E ~ Exp(1)``. A seeded
request's plain decoding takes ``E`` for its ``t``-th sampled token from its own generator,
one vocabulary row per token in order. Here every node at depth ``d`` uses the row of token
``t0 + d`` (``t0``: the step's first, whose row the step's sampler drew), and afterwards the
generator is set where plain decoding leaves it after the committed tokens: a seeded
request's tokens are the ones it gets without speculation, whatever was drafted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_service.engine.batch import ScheduledBatch, ScheduledSequence, tree_mask
from engine_service.engine.outputs import TokenLogprob
from engine_service.engine.request import Request
from engine_service.engine.sampler import (
    SamplingMetadata,
    _pinned_to,
    apply_penalties,
    draws_seeded,
    processed_probs,
    race,
)
from engine_service.engine.structured import allocate_bitmask, apply_bitmask


@dataclass(slots=True)
class _Verified:
    """One sequence's draft tree among the rows being verified."""

    index: int  # its sample row
    request: Request
    seq: ScheduledSequence
    base: int  # the root's row among the verified rows; node i is row base + i
    parents: list[int]
    ancestors: torch.Tensor  # [n + 1, n + 1]: node i's path, itself included (tree_mask)
    depths: list[int]

    @property
    def span(self) -> slice:
        return slice(self.base, self.base + len(self.depths))


@torch.inference_mode()
def verify(
    logits: torch.Tensor,
    batch: ScheduledBatch,
    meta: SamplingMetadata,
    generator: torch.Generator,
    grammar_masks: dict[int, torch.Tensor] | None = None,
) -> dict[int, list[int]]:
    """Tokens to commit for every sample row whose sequence verified drafts, by row index
    into ``batch.sample_rows``, and each such sequence's ``accepted_path``.

    ``logits``: fp32 ``[batch.num_logits, vocab]``; ``meta``: the step's sampling metadata
    over ``batch.sample_rows`` (its seeded rows' noise is the root's); ``grammar_masks``: per
    sample row, the bitmask of each tree node
    (:func:`~engine_service.engine.spec.grammar.draft_grammar_masks`). A seeded request's
    generator is left after the noise of the tokens committed."""
    trees: list[_Verified] = []
    logits_rows: list[int] = []
    for index, (first, request) in enumerate(batch.sample_rows):
        seq = batch.sequences[batch.sample_seqs[index]]
        if not seq.draft_token_ids:
            continue
        parents = seq.draft_parents or list(range(len(seq.draft_token_ids)))
        ancestors, depths = tree_mask(parents)
        trees.append(_Verified(index, request, seq, len(logits_rows), parents, ancestors, depths))
        logits_rows.extend(range(first, first + len(depths)))
    if not trees:
        return {}
    device = logits.device
    vocab = logits.shape[-1]
    rows = logits[torch.tensor(logits_rows, device=device)]
    node_sample = torch.tensor([t.index for t in trees for _ in t.depths], device=device)
    all_greedy = all(t.request.params.greedy for t in trees)
    node_meta = meta.for_rows(node_sample, all_greedy)

    # The plain sampler's order: penalties, the grammar's mask, min_tokens, then the draw.
    if node_meta.output_counts is not None:
        add_path_counts(node_meta.output_counts, trees)
        rows = apply_penalties(rows, node_meta)
    constrained = [t for t in trees if grammar_masks and t.index in grammar_masks]
    if constrained:
        bitmask = allocate_bitmask(len(logits_rows), vocab, pin_memory=False)
        for t in constrained:
            bitmask[t.span] = grammar_masks[t.index]
        rows = apply_bitmask(rows, bitmask)
    for t in trees:
        tree_rows = rows[t.span]
        held = hold_back_stops(tree_rows, t.request, t.depths)
        if held is not tree_rows:
            rows[t.span] = held
    emitted = rows.argmax(dim=-1)
    states: dict[int, list[torch.Tensor]] = {}
    if not all_greedy:
        node_meta.seeded_rows, node_meta.seeded_noise, states = _seeded_noise(
            trees, batch, meta, vocab, device
        )
        drawn = race(processed_probs(rows, node_meta), node_meta, generator)
        emitted = torch.where(node_meta.greedy, emitted, drawn)

    emitted_list = emitted.tolist()
    result: dict[int, list[int]] = {}
    for t in trees:
        drafts = t.seq.draft_token_ids
        children: dict[tuple[int, int], int] = {}
        for node, (parent, token) in enumerate(zip(t.parents, drafts, strict=True), start=1):
            children.setdefault((parent, token), node)
        node, path = 0, []
        while (node, emitted_list[t.base + node]) in children:
            node = children[(node, emitted_list[t.base + node])]
            path.append(node)
        t.seq.accepted_path = path
        result[t.index] = [drafts[n - 1] for n in path] + [emitted_list[t.base + node]]
        if t.index in states:
            # Plain decoding would have drawn the noise of len(path) + 1 tokens by now.
            t.request.generator.set_state(states[t.index][len(path)])
    return result


def add_path_counts(counts: torch.Tensor, trees: list[_Verified]) -> None:
    """Penalties count the output so far: node ``i``'s row (``counts`` row ``base + i``,
    holding the request's output counts) also counts the drafts on the path to ``i``, the
    tokens it would follow if accepted. Only penalised requests' rows are touched."""
    node_rows, tokens = [], []
    for t in trees:
        if not t.request.params.needs_penalties:
            continue
        nodes, on_path = t.ancestors[:, 1:].nonzero(as_tuple=True)  # drafts are nodes 1..n
        node_rows.append(nodes + t.base)
        tokens.append(torch.tensor(t.seq.draft_token_ids, dtype=torch.long)[on_path])
    if not node_rows:
        return
    index = (torch.cat(node_rows).to(counts.device), torch.cat(tokens).to(counts.device))
    counts.index_put_(index, torch.ones(len(index[0]), device=counts.device), accumulate=True)


def _seeded_noise(
    trees: list[_Verified],
    batch: ScheduledBatch,
    meta: SamplingMetadata,
    vocab: int,
    device: torch.device,
):
    """Exponential noise for the nodes of seeded sampled requests: depth ``d`` takes the
    row of the request's token ``t0 + d``, depth 0 the row the step's sampler drew (``meta``),
    the deeper ones drawn here from the request's generator. Returns (node rows, their noise,
    per sample row the generator's state after each depth's row)."""
    seeded_samples = [i for i, (_, r) in enumerate(batch.sample_rows) if draws_seeded(r)]
    rank = {sample: j for j, sample in enumerate(seeded_samples)}
    node_rows: list[int] = []
    noise: list[torch.Tensor] = []
    states: dict[int, list[torch.Tensor]] = {}
    for t in trees:
        if t.index not in rank:
            continue
        generator = t.request.generator
        after = [generator.get_state()]
        deeper = []
        for _ in range(max(t.depths)):
            deeper.append(torch.empty(vocab).exponential_(generator=generator))
            after.append(generator.get_state())
        states[t.index] = after
        by_depth = torch.cat(
            [meta.seeded_noise[rank[t.index]][None], _pinned_to(torch.stack(deeper), device)]
        )
        noise.append(by_depth[torch.tensor(t.depths, device=device)])
        node_rows.extend(range(t.base, t.base + len(t.depths)))
    if not node_rows:
        return None, None, states
    return torch.tensor(node_rows, device=device), torch.cat(noise), states


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


def verified_logprobs(
    logits: torch.Tensor, batch: ScheduledBatch, verified: dict[int, list[int]]
) -> dict[int, list[TokenLogprob]]:
    """The target's own logprobs (unmasked, as the sampler reports them) of every committed
    token of a verified run, for the samples that asked for logprobs: the row a token was
    judged at is the root's or that of the accepted node before it."""
    out: dict[int, list[TokenLogprob]] = {}
    for index, tokens in verified.items():
        first, request = batch.sample_rows[index]
        k = request.params.logprobs
        if k is None:
            continue
        seq = batch.sequences[batch.sample_seqs[index]]
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
