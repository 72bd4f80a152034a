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

On the device. The walk is tensor code over the padded trees of the whole batch: a node
matches when its parent's draw is its token, it is accepted when every node on its path
matches, and the accepted nodes form one path whose deepest node gives the count and, with
its ancestors, the drafts to commit. The committed tokens, their counts and the paths come
back to the host in the step's one read-back, with the sampled tokens
(:meth:`Verification.read`).

Seeds. A draw is the sampler's race, ``argmax(p / E)`` with ``E ~ Exp(1)``. A seeded
request's plain decoding takes ``E`` for its ``t``-th sampled token from its own generator,
one vocabulary row per token in order. Here every node at depth ``d`` uses the row of token
``t0 + d`` (``t0``: the step's first, whose row the step's sampler drew), and afterwards the
generator is set where plain decoding leaves it after the committed tokens: a seeded
request's tokens are the ones it gets without speculation, whatever was drafted. That needs
the committed count before the next step draws, so a step with seeded sampled drafts reads
its counts back at once (a second read-back, for those requests only).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from engine_service.engine.batch import DeviceDrafts, ScheduledBatch, ScheduledSequence, tree_mask
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
class _Trees:
    """The draft trees being verified, padded to ``width`` nodes each (the root included):
    tree ``v`` is sample row ``index[v]``; its node ``i`` is logits row ``rows[v * width +
    i]`` and row ``v * width + i`` of the verified rows. Padding nodes repeat the root's row
    and have no draft (``-1``), so they are never accepted. Built with numpy, no loop over
    nodes."""

    index: list[int]
    seq_indices: list[int]  # into batch.sequences
    seqs: list[ScheduledSequence]
    requests: list[Request]
    sizes: list[int]  # nodes per tree, the root included
    width: int
    rows: np.ndarray  # [V * width] logits rows
    drafts: np.ndarray  # [V, width]: node i's token (-1: the root, padding, a duplicate)
    depths: np.ndarray | None = None  # [V, width]
    # Only when some sequence drafted a tree (None: all chains, node i under i - 1).
    parents: np.ndarray | None = None  # [V, width] (the root's and padding's: 0)
    ancestors: np.ndarray | None = None  # [V, width, width] bool: node i's path, root and i
    # Trees whose shape is on the device (the batch's DeviceDrafts, in tree order): no
    # host parents, depths or ancestors at all.
    on_device: bool = False

    @property
    def is_tree(self) -> bool:
        return self.ancestors is not None or self.on_device

    @classmethod
    def gather(cls, batch: ScheduledBatch) -> _Trees | None:
        picked = [
            (index, first, request, batch.sequences[batch.sample_seqs[index]])
            for index, (first, request) in enumerate(batch.sample_rows)
        ]
        picked = [p for p in picked if p[3].draft_token_ids]
        if not picked:
            return None
        sizes = [len(seq.draft_token_ids) + 1 for *_, seq in picked]
        num, width = len(picked), max(sizes)
        steps = np.arange(width)
        drafts = np.full((num, width), -1, dtype=np.int64)
        for v, (*_, seq) in enumerate(picked):
            drafts[v, 1 : sizes[v]] = seq.draft_token_ids
        firsts = np.array([p[1] for p in picked], dtype=np.int64)
        within = np.where(steps[None, :] < np.array(sizes)[:, None], steps[None, :], 0)
        trees = cls(
            index=[p[0] for p in picked],
            seq_indices=[batch.sample_seqs[p[0]] for p in picked],
            seqs=[p[3] for p in picked],
            requests=[p[2] for p in picked],
            sizes=sizes,
            width=width,
            rows=(firsts[:, None] + within).reshape(-1),
            drafts=drafts,
        )
        if any(seq.device_tree for *_, seq in picked):
            # Every drafted sequence's (trees_stay_on_device: no penalties, seeds or
            # held-back stops, which would need the shape here).
            trees.on_device = True
            return trees
        # Penalties count each node's path (add_path_counts) through the ancestor masks.
        if any(
            seq.draft_parents is not None or r.params.needs_penalties for _, _, r, seq in picked
        ):
            trees._shape_trees()
        else:
            trees.depths = np.broadcast_to(steps, (num, width))
        return trees

    def _shape_trees(self) -> None:
        """Parents, depths and ancestor masks when some sequence drafted a tree (the
        chains among them are trees too)."""
        num, width, steps = len(self.sizes), self.width, np.arange(self.width)
        parents = np.zeros((num, width), dtype=np.int64)
        alone, chain, before = _masks(width)
        ancestors = np.repeat(alone[None], num, axis=0)
        for v, seq in enumerate(self.seqs):
            n = self.sizes[v]
            if seq.draft_parents is None:  # a chain: draft i hangs under i - 1
                parents[v, 1:n] = steps[: n - 1]
                ancestors[v, :n, :n] = chain[:n, :n]
            else:
                parents[v, 1:n] = seq.draft_parents
                mask = seq.custom_mask  # place_drafts' tree_mask of these parents
                if mask is None or mask.shape[0] != n:
                    mask, _ = tree_mask(seq.draft_parents)
                ancestors[v, :n, :n] = mask.numpy()
        drafts = self.drafts
        # A later sibling with an earlier one's token is never reached: the walk takes the
        # first child whose token was drawn.
        same = (parents[:, :, None] == parents[:, None, :]) & (
            drafts[:, :, None] == drafts[:, None, :]
        )
        drafts[(same & before & (drafts[:, None, :] >= 0)).any(axis=2)] = -1
        self.parents, self.ancestors = parents, ancestors
        self.depths = ancestors.sum(axis=2) - 1

    def span(self, v: int) -> slice:
        """Tree ``v``'s real nodes among the verified rows."""
        return slice(v * self.width, v * self.width + self.sizes[v])


@functools.cache
def _masks(width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per tree width: a lone node's ancestors (itself and the root), a chain's (the lower
    triangle), and which nodes come before each (the strict lower triangle)."""
    alone = np.eye(width, dtype=bool)
    alone[:, 0] = True
    chain = np.tril(np.ones((width, width), dtype=bool))
    return alone, chain, np.tril(chain, k=-1)


@dataclass(slots=True)
class Verification:
    """A step's verification on the device: per verified tree, how many tokens to commit,
    which, the accepted path and (for samples that asked) their logprobs; turned into
    Python values by :meth:`read` from the step's one read-back."""

    trees: _Trees
    # int64, a row per tree: chains: the count, each node's draw (and the drafts, when
    # they were on the device); trees: the count, the committed tokens, the path.
    packed: torch.Tensor
    # Logprob samples (tree numbers), their chosen logprobs [L, width], top-k values and
    # ids [L, width, k] (k may be 0), and each one's own k.
    logprob_trees: list[int]
    logprob_tensors: tuple[torch.Tensor, ...] = ()
    logprob_counts: list[int] | None = None
    # Trees only, on the device: each verified node's logits row ``[V * width]``, the
    # accepted nodes by depth ``[V, width]`` (column ``d - 1``: depth ``d``) and their count
    # ``[V, 1]``, for moving the accepted paths' KV before the read-back
    # (:meth:`~engine_service.engine.model_runner.ModelRunner.move_accepted_paths`).
    node_rows: torch.Tensor | None = None
    path: torch.Tensor | None = None
    count: torch.Tensor | None = None
    moved_on_device: bool = False

    def host_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.packed, *self.logprob_tensors)

    def read(
        self, host: tuple[torch.Tensor, ...]
    ) -> tuple[dict[int, list[int]], dict[int, list[TokenLogprob]]]:
        """From the host copies of :meth:`host_tensors`: the tokens to commit and their
        logprobs by sample row; sets each sequence's ``accepted_path``."""
        trees, width = self.trees, self.trees.width
        packed = host[0].tolist()
        committed: dict[int, list[int]] = {}
        if not trees.is_tree:  # chains: count, the draws (, the drafts from the device)
            for v, values in enumerate(packed):
                count, seq = values[0], trees.seqs[v]
                drafts = values[1 + width :] if len(values) > 1 + width else seq.draft_token_ids
                seq.accepted_path = list(range(1, count + 1))
                committed[trees.index[v]] = [*drafts[:count], values[1 + count]]
        else:  # trees: count, the committed tokens, the accepted path
            for v, values in enumerate(packed):
                count = values[0]
                trees.seqs[v].accepted_path = values[1 + width : 1 + width + count]
                committed[trees.index[v]] = values[1 : 2 + count]
        logprobs: dict[int, list[TokenLogprob]] = {}
        if self.logprob_trees:
            chosen = host[1].tolist()
            top_values = host[2].tolist() if len(host) > 2 else None
            top_ids = host[3].tolist() if len(host) > 3 else None
            for j, v in enumerate(self.logprob_trees):
                tokens, k = committed[trees.index[v]], self.logprob_counts[j]
                logprobs[trees.index[v]] = [
                    TokenLogprob(
                        token,
                        chosen[j][d],
                        list(zip(top_ids[j][d][:k], top_values[j][d][:k])) if top_ids else [],
                    )
                    for d, token in enumerate(tokens)
                ]
        return committed, logprobs


@torch.inference_mode()
def verify(
    logits: torch.Tensor,
    batch: ScheduledBatch,
    meta: SamplingMetadata,
    generator: torch.Generator,
    grammar_masks: dict[int, torch.Tensor] | None = None,
) -> Verification | None:
    """Verify every sample row whose sequence drafted, on the device (no read-back, except
    for seeded sampled drafts: see the module's docstring); None when nothing drafted.

    ``logits``: fp32 ``[batch.num_logits, vocab]``; ``meta``: the step's sampling metadata
    over ``batch.sample_rows`` (its seeded rows' noise is the root's); ``grammar_masks``: per
    sample row, the bitmask of each tree node
    (:func:`~engine_service.engine.spec.grammar.draft_grammar_masks`). A seeded request's
    generator is left after the noise of the tokens committed."""
    trees = _Trees.gather(batch)
    if trees is None:
        return None
    device = logits.device
    num, width = len(trees.index), trees.width
    vocab = logits.shape[-1]
    # Everything the device needs from the host, in one copy.
    pieces = [trees.rows, trees.drafts.reshape(-1)]
    on_device = batch.device_drafts
    in_order = on_device is not None and on_device.seqs == trees.seq_indices
    # Device trees are every drafted sequence's, drafted in batch order (grow_full_trees).
    assert in_order or not trees.on_device, "device trees are verified in their order"
    if on_device is not None and not in_order:  # where each device draft goes among the nodes
        dst, src = _device_draft_places(trees, on_device)
        pieces += [dst, src]
    if trees.ancestors is not None:
        # Per node: parent, depth, the path column of its token (depth - 1; the root's:
        # the spare last), its number; then the ancestor masks without the root's column
        # (node i is accepted when all the drafts on its path match).
        column = trees.depths - 1
        column[:, 0] = width - 1
        nodes = np.broadcast_to(np.arange(width), (num, width))
        pieces += [a.reshape(-1) for a in (trees.parents, trees.depths, column, nodes)]
        pieces.append(trees.ancestors[:, :, 1:].reshape(-1).astype(np.int64))
    ints = _pinned_to(torch.from_numpy(np.concatenate(pieces)), device)
    rows_index, drafts = ints[: num * width], ints[num * width : 2 * num * width].view(num, width)
    rest = ints[2 * num * width :]
    if in_order:  # the placeholders' places (the padding stays -1)
        drafts = torch.cat(
            (drafts[:, :1], drafts[:, 1:].where(drafts[:, 1:] < 0, on_device.tokens)), 1
        )
    elif on_device is not None:
        places, rest = rest[: 2 * len(dst)].view(2, -1), rest[2 * len(dst) :]
        drafts.view(-1)[places[0]] = on_device.tokens.reshape(-1)[places[1]]
    all_greedy = all(r.params.greedy for r in trees.requests)
    node_meta = None
    if not all_greedy or meta.output_counts is not None:
        node_sample = _pinned_to(torch.tensor(trees.index), device).repeat_interleave(width)
        node_meta = meta.for_rows(node_sample, all_greedy)
    constrained = [v for v, i in enumerate(trees.index) if grammar_masks and i in grammar_masks]
    held_back = [
        v for v, r in enumerate(trees.requests) if r.num_output_tokens < r.params.min_tokens
    ]
    assert not (held_back and trees.on_device), "held-back stops need the trees' depths"

    states: dict[int, list[torch.Tensor]] = {}
    if node_meta is None and not constrained and not held_back:
        emitted = logits.argmax(dim=-1)[rows_index]  # greedy, nothing to apply first
    else:
        # The plain sampler's order: penalties, the grammar's mask, min_tokens, the draw.
        rows = logits[rows_index]
        if node_meta is not None and node_meta.output_counts is not None:
            add_path_counts(node_meta.output_counts, trees)
            rows = apply_penalties(rows, node_meta)
        if constrained:
            bitmask = allocate_bitmask(num * width, vocab, pin_memory=False)
            for v in constrained:
                bitmask[trees.span(v)] = grammar_masks[trees.index[v]]
            rows = apply_bitmask(rows, bitmask)
        for v in held_back:
            tree_rows = rows[trees.span(v)]
            depths = trees.depths[v, : trees.sizes[v]]
            held = hold_back_stops(tree_rows, trees.requests[v], depths)
            if held is not tree_rows:
                tree_rows.copy_(held)
        emitted = rows.argmax(dim=-1)
        if not all_greedy:
            node_meta.seeded_rows, node_meta.seeded_noise, states = _seeded_noise(
                trees, batch, meta, vocab, device
            )
            drawn = race(processed_probs(rows, node_meta), node_meta, generator)
            emitted = torch.where(node_meta.greedy, emitted, drawn)
    emitted = emitted.view(num, width)

    path = tokens = None
    if not trees.is_tree:
        # Chains: draft i is accepted while it and every draft before it match the draw
        # at the node before it. The host cuts the committed run from the read-back: the
        # drafts up to the count, then the draw there.
        drafted = drafts[:, 1:]
        count = (emitted[:, :-1] == drafted).cumprod(dim=1).sum(dim=1, keepdim=True)
        packed = torch.cat((count, emitted, drafted) if on_device else (count, emitted), dim=1)
    else:
        # Trees: node i matches when its parent drew its token, and is accepted when every
        # node on its path matches. One child of a node can match, so the accepted nodes
        # form a path from the root; the deepest ends it.
        if trees.on_device:
            parents, depths, column, nodes, ancestors = _device_tree_shape(on_device, width)
        else:
            parents, depths, column, nodes = rest[: 4 * num * width].view(4, num, width)
            ancestors = rest[4 * num * width :].view(num, width, width - 1).bool()
        matched = emitted.gather(1, parents) == drafts
        accepted = (ancestors <= matched[:, None, 1:]).all(dim=-1)  # the root always
        # The deepest accepted node (unique: one per depth; the root when no other).
        count, deepest = torch.where(accepted, depths, -1).max(dim=1, keepdim=True)
        # The accepted node at depth d goes to column d - 1, the others (and the root) to
        # the spare last column, which the committed run never reads as a draft.
        column = torch.where(accepted, column, width - 1)
        path = torch.zeros_like(drafts).scatter_(1, column, nodes)
        tokens = torch.zeros_like(drafts).scatter_(1, column, drafts)
        tokens.scatter_(1, count, emitted.gather(1, deepest))
        packed = torch.cat((count, tokens, path), dim=1)

    if states:
        # Plain decoding would have drawn the noise of count + 1 tokens by now.
        counts = count[:, 0].tolist()
        for v, after in states.items():
            trees.requests[v].generator.set_state(after[counts[v]])

    verification = Verification(trees, packed, logprob_trees=[])
    if trees.is_tree:
        verification.node_rows, verification.path, verification.count = rows_index, path, count
    want = [v for v, r in enumerate(trees.requests) if r.params.logprobs is not None]
    if want:
        if path is None:  # a chain's path (drafts 1, 2, ...) and committed tokens
            path = torch.arange(1, width + 1, device=device).expand(num, width)
            tokens = torch.cat((drafts[:, 1:], count), dim=1)
            tokens.scatter_(1, count, emitted.gather(1, count))
        _logprobs(verification, want, logits, rows_index.view(num, width), path, tokens)
    return verification


def _device_tree_shape(drafts: DeviceDrafts, width: int) -> tuple[torch.Tensor, ...]:
    """What the walk needs of trees whose shape is on the device, laid out as the host
    builds it (the root at column 0): parents, depths, each node's path column, node
    numbers ``[V, width]`` and the ancestor masks without the root's column."""
    num = drafts.tokens.shape[0]
    device = drafts.tokens.device
    root = torch.zeros(num, 1, dtype=torch.int64, device=device)
    parents = torch.cat((root, drafts.parents), dim=1)
    depths = torch.cat((root, drafts.depths), dim=1)
    column = depths - 1
    column[:, 0] = width - 1
    nodes = torch.arange(width, device=device).expand(num, width)
    none = torch.zeros(num, 1, width - 1, dtype=torch.bool, device=device)
    return parents, depths, column, nodes, torch.cat((none, drafts.ancestors), dim=1)


def _device_draft_places(trees: _Trees, drafts: DeviceDrafts) -> tuple[np.ndarray, np.ndarray]:
    """For drafts still on the device: each one's place among the verified nodes (flat,
    ``v * width + node``) and in the flattened draft tensor."""
    row_of = {seq: r for r, seq in enumerate(drafts.seqs)}
    dst, src = [], []
    stride = drafts.tokens.shape[1]
    for v, seq_index in enumerate(trees.seq_indices):
        r = row_of.get(seq_index)
        if r is not None:
            n = drafts.lengths[r]
            dst.append(np.arange(v * trees.width + 1, v * trees.width + 1 + n))
            src.append(np.arange(r * stride, r * stride + n))
    return np.concatenate(dst), np.concatenate(src)


def _logprobs(
    verification: Verification,
    want: list[int],
    logits: torch.Tensor,
    node_rows: torch.Tensor,
    path: torch.Tensor,
    tokens: torch.Tensor,
) -> None:
    """The target's own logprobs (unmasked, as the sampler reports them) of each committed
    token of the trees ``want``: token ``d`` was judged at the root's row (``d = 0``) or at
    that of accepted node ``d``. Every position is computed; :meth:`Verification.read`
    keeps the committed ones."""
    requests = verification.trees.requests
    index = _pinned_to(torch.tensor(want), logits.device)
    judged = torch.cat((torch.zeros_like(path[:, :1]), path[:, :-1]), dim=1)[index]
    rows = node_rows[index].gather(1, judged)
    raw = torch.log_softmax(logits[rows.reshape(-1)], dim=-1).view(len(want), rows.shape[1], -1)
    chosen = raw.gather(2, tokens[index].clamp(min=0)[:, :, None])[:, :, 0]  # -1: not committed
    counts = [requests[v].params.logprobs for v in want]
    verification.logprob_trees = want
    verification.logprob_counts = counts
    verification.logprob_tensors = (chosen,)
    if max(counts):
        top = raw.topk(max(counts), dim=-1)
        verification.logprob_tensors = (chosen, top.values, top.indices)


def add_path_counts(counts: torch.Tensor, trees: _Trees) -> None:
    """Penalties count the output so far: node ``i``'s row (``counts`` row ``v * width +
    i``, holding the request's output counts) also counts the drafts on the path to ``i``,
    the tokens it would follow if accepted. Only penalised requests' rows are touched."""
    penalised = [v for v, r in enumerate(trees.requests) if r.params.needs_penalties]
    if not penalised:
        return
    chosen = np.array(penalised)
    on_path = trees.ancestors[chosen].copy()
    on_path[:, :, 0] = False  # drafts are nodes 1..n; padding nodes see only themselves
    which, nodes, drafts = np.nonzero(on_path & (trees.drafts[chosen][:, None, :] >= 0))
    # A duplicate sibling (token -1 here) is unreachable; its own row's counts do not matter.
    tree = chosen[which]
    index = (
        torch.from_numpy(tree * trees.width + nodes).to(counts.device),
        torch.from_numpy(trees.drafts[tree, drafts]).to(counts.device),
    )
    counts.index_put_(index, torch.ones(len(index[0]), device=counts.device), accumulate=True)


def _seeded_noise(
    trees: _Trees,
    batch: ScheduledBatch,
    meta: SamplingMetadata,
    vocab: int,
    device: torch.device,
):
    """Exponential noise for the nodes of seeded sampled requests: depth ``d`` takes the
    row of the request's token ``t0 + d``, depth 0 the row the step's sampler drew (``meta``),
    the deeper ones drawn here from the request's generator. Returns (node rows, their noise,
    per tree the generator's state after each depth's row)."""
    seeded_samples = [i for i, (_, r) in enumerate(batch.sample_rows) if draws_seeded(r)]
    rank = {sample: j for j, sample in enumerate(seeded_samples)}
    node_rows: list[int] = []
    noise: list[torch.Tensor] = []
    states: dict[int, list[torch.Tensor]] = {}
    for v, index in enumerate(trees.index):
        if index not in rank:
            continue
        generator = trees.requests[v].generator
        depths = trees.depths[v, : trees.sizes[v]].copy()  # a chain's are a read-only view
        after = [generator.get_state()]
        deeper = []
        for _ in range(int(depths.max())):
            deeper.append(torch.empty(vocab).exponential_(generator=generator))
            after.append(generator.get_state())
        states[v] = after
        by_depth = torch.cat(
            [meta.seeded_noise[rank[index]][None], _pinned_to(torch.stack(deeper), device)]
        )
        noise.append(by_depth[_pinned_to(torch.from_numpy(depths), device)])
        node_rows.extend(range(trees.span(v).start, trees.span(v).stop))
    if not node_rows:
        return None, None, states
    return _pinned_to(torch.tensor(node_rows), device), torch.cat(noise), states


def hold_back_stops(rows: torch.Tensor, request, offsets) -> torch.Tensor:
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
    index = _pinned_to(torch.tensor(early), rows.device)
    stop_ids = _pinned_to(torch.tensor(sorted(stops)), rows.device)
    held[index[:, None], stop_ids[None, :]] = float("-inf")
    if request.grammar is not None:
        dead = ~torch.isfinite(held).any(dim=-1, keepdim=True)
        held = torch.where(dead, rows, held)
    return held
