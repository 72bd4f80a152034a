"""Proposers: where draft tokens come from. Each fills the draft slots the scheduler reserved.

Contract: :meth:`Proposer.propose` gets the scheduled batch and returns, per sequence index
with ``draft_room > 0``, at most that many tokens that continue the sequence's known tokens;
fewer (or none) is fine. Chains drafted in graphs may stay on the device
(:class:`~engine_service.engine.batch.DeviceDrafts`): the target's step reads them there,
and the round's one read-back brings back what it accepted. It must not change the batch or any request: the engine places the
drafts and the target model verifies them, so a proposer can only make steps faster or
slower, never change an output.
"""

from __future__ import annotations

import abc
import logging
from typing import TYPE_CHECKING

import torch

from engine_service.engine.batch import DeviceDrafts, ScheduledBatch, ScheduledSequence, tree_mask
from engine_service.engine.config import EngineConfig
from engine_service.engine.cuda_graphs import StepGraphs
from engine_service.engine.memory import rank_kv_block_shape
from engine_service.engine.model_runner import ModelRunner
from engine_service.engine.parallel.channel import StepChannel
from engine_service.engine.request import Request
from engine_service.engine.sampler import draws_seeded
from engine_service.engine.spec.config import SpeculativeConfig, check_same_tokenizer
from engine_service.engine.spec.graphs import (
    ChainGraphs,
    DraftModelCalls,
    TreeGraphs,
    greedy_ids,
)
from engine_service.layers.paged_attention import AttentionBackend
from engine_service.layers.parallel import SINGLE, TensorParallel
from engine_service.models.config import ModelConfig
from engine_service.models.hidden_states import HiddenStateStore
from engine_service.models.loader import load_model, resolve_model_path

if TYPE_CHECKING:
    from engine_service.engine.parallel.channel import StepChannel

logger = logging.getLogger(__name__)


class Proposer(abc.ABC):
    # The target features the proposer drafts from (EAGLE): the engine has the target keep
    # them per slot. None: the proposer reads tokens only.
    hidden_store: HiddenStateStore | None = None

    @abc.abstractmethod
    def propose(self, batch: ScheduledBatch) -> dict[int, list[int]] | DeviceDrafts: ...

    def tree_parents(self) -> dict[int, list[int]]:
        """For the drafts :meth:`propose` just returned that form trees: each draft's parent
        (0: the sequence's newest known token). Chains are left out."""
        return {}

    def observe_target(self, batch: ScheduledBatch, hidden: torch.Tensor) -> None:
        """After each target forward: its final hidden states ``[batch.num_tokens, hidden]``
        (a buffer the next step may overwrite), for proposers that draft from them."""
        return None

    def for_peer(self, channel: StepChannel) -> Proposer:
        """A proposer of the same kind for another data-parallel rank's batches: its model
        (a whole copy) and caches live in that rank's process, which runs the steps sent
        through ``channel`` (of draft steps, to that rank) and sends back their results."""
        raise NotImplementedError(f"{type(self).__name__} drafts on one rank only")

    def capture_graphs(
        self, max_tokens: int, max_seqs: int, pool=None, capture: bool = True
    ) -> None:
        """Capture the proposer's forward passes as CUDA graphs, once the target's are
        (steps of up to ``max_tokens`` tokens and ``max_seqs`` sequences, in the target
        graphs' memory ``pool``); ``capture=False`` builds the CPU twin of the same buffers
        and padding instead (:mod:`engine_service.engine.spec.graphs`). Default: nothing to
        capture (n-gram lookup runs no model; MTP's forwards run eagerly)."""
        return None

    def close(self) -> None:
        return None


class NgramProposer(Proposer):
    """Prompt lookup: find the sequence's last ``n`` tokens earlier in it (longest ``n``
    from ``prompt_lookup_max`` down to ``prompt_lookup_min``, most recent match) and propose
    what followed there. Free to compute, and strong where outputs repeat their input (code
    edits, extraction, summaries that quote). Each sequence keeps an index of its n-grams
    (:class:`_NgramIndex`), extended by the tokens accepted since its last proposal, so a
    round costs a few dictionary look-ups per sequence, not a scan of its tokens."""

    def __init__(self, num_tokens: int, lookup_min: int, lookup_max: int) -> None:
        self.num_tokens = num_tokens
        self.lookup_min = lookup_min
        self.lookup_max = lookup_max
        # id(request) -> its index (which holds the request, so the id stays its own;
        # and its token list, the same object for the request's life)
        self._indexes: dict[int, _NgramIndex] = {}

    def for_peer(self, channel: StepChannel) -> Proposer:
        return self  # no model: the tokens are all it reads (indexes are per request)

    def propose(self, batch: ScheduledBatch) -> dict[int, list[int]]:
        drafts = {}
        indexes = self._indexes
        for index, seq in enumerate(batch.sequences):
            if seq.draft_room:
                request = seq.request
                ngrams = indexes.get(id(request))
                if ngrams is None or ngrams.tokens is not request.all_token_ids:
                    ngrams = indexes[id(request)] = _NgramIndex(
                        request, request.all_token_ids, self.lookup_min, self.lookup_max
                    )
                found = ngrams.lookup(min(seq.draft_room, self.num_tokens))
                if found:
                    drafts[index] = found
        if len(indexes) > 2 * len(batch.sequences):
            self._indexes = {k: v for k, v in indexes.items() if not v.request.is_finished}
        return drafts

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """The proposal for a sequence of ``tokens`` (a fresh index)."""
        return _NgramIndex(None, tokens, self.lookup_min, self.lookup_max).lookup(k)


class _NgramIndex:
    """Where each n-gram of a sequence (``lookup_min <= n <= lookup_max``) last starts,
    among the windows that end before the newest token (which a grammar's jump-forward may
    still replace); extended on each look-up by the windows that have ended since."""

    __slots__ = ("indexed", "request", "starts", "tokens")

    def __init__(self, request, tokens: list[int], lookup_min: int, lookup_max: int) -> None:
        self.request = request
        self.tokens = tokens  # the sequence's own list, which grows in place
        self.starts: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(lookup_max, lookup_min - 1, -1)
        }
        self.indexed = 0  # windows ending at or before this index are in

    def lookup(self, k: int) -> list[int]:
        tokens, length = self.tokens, len(self.tokens)
        if length - 1 < self.indexed:  # the sequence got shorter: start over
            self.indexed = 0
            for starts in self.starts.values():
                starts.clear()
        for end in range(self.indexed + 1, length):
            for n, starts in self.starts.items():
                if end >= n:
                    starts[tuple(tokens[end - n : end])] = end - n
        self.indexed = max(self.indexed, length - 1)
        for n, starts in self.starts.items():  # the longest n first
            if n > length - 1:
                continue
            start = starts.get(tuple(tokens[length - n :]))
            if start is not None:
                return tokens[start + n : start + n + k]
        return []


class DraftModelProposer(Proposer):
    """A smaller model with the same tokenizer proposes tokens greedily. Its KV lives in a
    cache tensor of its own, indexed by the target's block tables and slots (the same
    positions), so it needs no block bookkeeping: what a rejected draft wrote is overwritten
    when the position is computed again. Each request first feeds the draft the tokens it
    has not seen (the whole prompt the first time, then the tokens accepted since).

    A chain takes one batched forward per token. With ``tree_topk`` (and ``tree_size``
    nodes at most), greedy samples get a token tree instead, grown by confidence as in
    EAGLE-2: the root's ``topk`` likeliest tokens, then each round the ``topk`` likeliest
    extensions of the newest nodes by path probability, until the tree is full or
    ``num_tokens`` deep; each round runs the draft over the whole tree under its mask.
    Every sample gets a tree, greedy or sampled, penalised or constrained: verification
    (:mod:`~engine_service.engine.spec.verify`) is lossless for any tree.
    """

    def __init__(
        self,
        runner: ModelRunner,
        num_tokens: int,
        max_tokens: int,
        tree_topk: int = 0,
        tree_size: int = 0,
        tree_batch_tokens: int = 0,
    ) -> None:
        self.runner = runner  # a ModelRunner over the draft model and its cache
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens  # the most tokens one draft forward takes
        self.tree_topk = tree_topk
        self.tree_size = tree_size
        self.tree_batch_tokens = tree_batch_tokens  # see step_tree_size
        self.parents: dict[int, list[int]] = {}  # the last proposal's trees, by sequence
        # id(request) -> (request, its preemption count, tokens fed to the draft)
        self._seen: dict[int, tuple[Request, int, int]] = {}
        self.chain_graphs: ChainGraphs | None = None  # chains after the first draft
        # Trees after the root, by tree size (one size unless trees shrink in large batches).
        self.tree_graphs_by_size: dict[int, TreeGraphs] = {}

    @property
    def tree_graphs(self) -> TreeGraphs | None:
        """The graphs of full-size trees."""
        return self.tree_graphs_by_size.get(self.tree_size)

    def propose(self, batch: ScheduledBatch) -> dict[int, list[int]] | DeviceDrafts:
        self.parents = {}
        chosen = [(i, s) for i, s in enumerate(batch.sequences) if s.draft_room]
        if not chosen:
            return {}
        known = {i: s.request.num_tokens for i, s in chosen}
        root_logits = self._catch_up(chosen, known)
        if self.tree_topk:
            return self._trees(chosen, known, root_logits, batch.tree_size)
        return self._chains(chosen, known, root_logits)

    def tree_parents(self) -> dict[int, list[int]]:
        return self.parents

    def for_peer(self, channel: StepChannel) -> Proposer:
        return DraftModelProposer(
            self.runner.remote_twin(channel),
            self.num_tokens,
            self.max_tokens,
            self.tree_topk,
            self.tree_size,
            self.tree_batch_tokens,
        )

    def capture_graphs(
        self, max_tokens: int, max_seqs: int, pool=None, capture: bool = True
    ) -> None:
        """Catch-ups and per-step forwards replay the draft runner's step graphs (through
        :meth:`ModelRunner.execute`); whole chains and trees replay drafting graphs."""
        runner = self.runner
        if getattr(runner.model, "computes_own_attention", False):
            return  # its attention is its own, not the backend's: eager, like such targets
        model, cache = runner.model, runner.kv_cache
        calls = DraftModelCalls(
            forward=lambda ids, positions, _, meta: model(ids, positions, cache, meta),
            logits=model.compute_logits,
        )
        capture_drafting(self, calls, max_tokens, max_seqs, 0, capture, pool)

    def _catch_up(self, chosen, known: dict[int, int]) -> dict[int, torch.Tensor]:
        """Feed each sequence's unseen known tokens; the draft's logits after the last."""
        sequences = []
        for i, seq in chosen:
            request = seq.request
            seen, epoch, fed = self._seen.get(id(request), (None, -1, 0))
            if seen is not request or epoch != request.num_preemptions:
                fed = 0
            fed = min(fed, known[i] - 1)  # at least the newest token, for its logits
            sequences.append((i, ScheduledSequence(request, fed, known[i] - fed, num_logits=1)))
        logits = self._forward(sequences)
        self._seen = {k: v for k, v in self._seen.items() if not v[0].is_finished}
        for i, seq in chosen:
            self._seen[id(seq.request)] = (seq.request, seq.request.num_preemptions, known[i])
        return {i: rows[0] for i, rows in logits.items()}

    def _chains(self, chains, known, root_logits) -> dict[int, list[int]] | DeviceDrafts:
        if self.chain_graphs is not None:
            # Draft r (r >= 2) is computed at cache index known + r - 2.
            return chain_drafts(
                self.chain_graphs,
                chains,
                greedy_ids(torch.stack([root_logits[i] for i, _ in chains])),
                None,
                [known[i] for i, _ in chains],
                [min(seq.draft_room, self.num_tokens) for _, seq in chains],
            )
        drafts = {i: [int(root_logits[i].argmax())] for i, _ in chains}
        depth = {i: min(seq.draft_room, self.num_tokens) for i, seq in chains}
        for round_index in range(1, max(depth.values())):
            active = [(i, seq) for i, seq in chains if round_index < depth[i]]
            if not active:
                break
            logits = self._forward(
                [
                    (
                        i,
                        ScheduledSequence(
                            seq.request,
                            known[i] + round_index - 1,
                            1,
                            num_logits=1,
                            draft_token_ids=[drafts[i][-1]],
                        ),
                    )
                    for i, seq in active
                ]
            )
            for i, _ in active:
                drafts[i].append(int(logits[i][0].argmax()))
        return drafts

    def _trees(
        self, trees, known, root_logits, size: int = 0
    ) -> dict[int, list[int]] | DeviceDrafts:
        """Grow every tree in lockstep, one batched draft forward per round."""
        drafts: dict[int, list[int]] = {}
        step_size = size or self.tree_size  # size: the scheduler's, under a tree budget
        if step_size in self.tree_graphs_by_size:
            base = [known[i] for i, _ in trees]
            grown_full = grow_full_trees(self, trees, base, root_logits, None, step_size)
            if isinstance(grown_full, DeviceDrafts):
                return grown_full
            drafts = grown_full
            trees = [(i, seq) for i, seq in trees if i not in drafts]
        grown = {}
        for i, seq in trees:
            size = min(seq.draft_room, step_size)
            top = root_logits[i].log_softmax(-1).topk(min(self.tree_topk, size))
            grown[i] = _Tree(size, top.indices.tolist(), top.values.tolist())
        for _ in range(1, self.num_tokens):
            active = [(i, seq) for i, seq in trees if grown[i].growing]
            if not active:
                break
            sequences = []
            for i, seq in active:
                tree = grown[i]
                mask, depths = tree_mask(tree.parents)
                sequences.append(
                    (
                        i,
                        ScheduledSequence(
                            seq.request,
                            known[i],
                            len(tree.tokens),
                            num_logits=len(tree.frontier),  # the newest nodes, last
                            draft_token_ids=list(tree.tokens),
                            custom_mask=mask[1:, 1:],
                            position_offsets=[d - n for n, d in enumerate(depths)][1:],
                        ),
                    )
                )
            logits = self._forward(sequences)
            for i, _ in active:
                grown[i].extend(logits[i].log_softmax(-1), self.tree_topk)
        for i, _ in trees:
            self.parents[i] = grown[i].parents
        return drafts | {i: grown[i].tokens for i, _ in trees}

    def _forward(self, sequences) -> dict[int, torch.Tensor]:
        """Draft logits for ``(key, sequence)`` pairs, split into forwards that fit."""
        out: dict[int, torch.Tensor] = {}
        group: list = []

        def flush() -> None:
            batch = ScheduledBatch()
            for _, sequence in group:
                batch.sequences.append(sequence)
                batch.num_tokens += sequence.num_tokens
                batch.num_logits += sequence.num_logits
            logits = self.runner.execute(batch, self.runner.prepare(batch))
            row = 0
            for key, sequence in group:
                out[key] = logits[row : row + sequence.num_logits]
                row += sequence.num_logits
            group.clear()

        total = 0
        for key, sequence in sequences:
            if group and total + sequence.num_tokens > self.max_tokens:
                flush()
                total = 0
            group.append((key, sequence))
            total += sequence.num_tokens
        if group:
            flush()
        return out


class _Tree:
    """A token tree being drafted: node ``n`` (1-based) is ``tokens[n - 1]`` under
    ``parents[n - 1]`` (0: the root), with its path's log-probability."""

    def __init__(self, size: int, tokens: list[int], scores: list[float]) -> None:
        self.size = size
        self.tokens, self.scores = tokens, scores
        self.parents = [0] * len(tokens)
        self.frontier = list(range(1, len(tokens) + 1))

    @property
    def growing(self) -> bool:
        return bool(self.frontier) and len(self.tokens) < self.size

    def extend(self, logprobs: torch.Tensor, topk: int, to_tokens=torch.Tensor.tolist) -> None:
        """Add the ``topk`` likeliest children of the frontier (rows: the frontier nodes'
        next-token log-probabilities, in order), by path probability, as the new frontier.
        ``to_tokens`` turns vocabulary rows into token ids."""
        candidates = []
        best = logprobs.topk(topk)
        values, tokens = best.values.tolist(), to_tokens(best.indices)  # two reads, not one a row
        for row, node in enumerate(self.frontier):
            for value, token in zip(values[row], tokens[row], strict=True):
                candidates.append((self.scores[node - 1] + value, node, token))
        candidates.sort(reverse=True)
        self.frontier = []
        for score, node, token in candidates[: min(topk, self.size - len(self.tokens))]:
            self.tokens.append(token)
            self.scores.append(score)
            self.parents.append(node)
            self.frontier.append(len(self.tokens))


def chain_drafts(
    graphs: ChainGraphs, chains, first_tokens, first_hidden, base, depth
) -> dict[int, list[int]] | DeviceDrafts:
    """The chains of ``chains`` (``(sequence index, sequence)`` pairs) from ``graphs``: left
    on the device unless a request needs its drafts on the host (a grammar's masks, the
    penalties' counts walk them there)."""
    tables = [seq.request.block_table for _, seq in chains]
    if any(seq.request.needs_host_tokens for _, seq in chains):
        rows = graphs.drafts(first_tokens, first_hidden, base, depth, tables)
        return {i: row for (i, _), row in zip(chains, rows, strict=True)}
    tokens = graphs.draft_tensor(first_tokens, first_hidden, base, depth, tables)
    return DeviceDrafts([i for i, _ in chains], tokens, depth)


def step_tree_size(proposer, num_trees: int) -> int:
    """The nodes each tree of a step with ``num_trees`` trees gets: the proposer's
    ``tree_size``, unless the trees would together verify more than its
    ``tree_batch_tokens`` nodes (a batch large enough that the target's step is no longer
    bound by reading its weights, where a wide tree costs more than it gains). Then the
    budget is shared out over the next power of two of trees, so that a few graph sets
    cover every batch, and a tree keeps at least ``topk + 1`` nodes. The scheduler sizes each
    step with it (``Scheduler.size_trees``) and hands the size on with the batch
    (``ScheduledBatch.tree_size``); the proposers grow their trees to that."""
    size, budget = proposer.tree_size, proposer.tree_batch_tokens
    if not budget or num_trees * size <= budget:
        return size
    bucket = 1 << (num_trees - 1).bit_length()
    return max(min(size, proposer.tree_topk + 1), budget // bucket)


def tree_sizes(proposer, max_trees: int) -> list[int]:
    """Every size :func:`step_tree_size` gives for 1 to ``max_trees`` trees, largest first."""
    return sorted({step_tree_size(proposer, n) for n in range(1, max_trees + 1)}, reverse=True)


def grow_full_trees(
    proposer, trees, base, roots, root_hidden, size: int
) -> dict[int, list[int]] | DeviceDrafts:
    """The drafts of the ``trees`` (``(sequence index, sequence)`` pairs) that get all of
    the step's ``size`` nodes (:func:`step_tree_size`), grown by the proposer's
    :class:`TreeGraphs` of that size (trees with less draft room are left to the host);
    their parents go into ``proposer.parents``.
    ``base``: each tree's node-1 cache index; ``roots``: root logits by sequence index;
    ``root_hidden``: an EAGLE head's root output rows by sequence index.

    When every tree is full and may stay on the device (:func:`trees_stay_on_device`), the
    trees come back as :class:`DeviceDrafts` with their shape, not read back: the target's
    step builds their mask and positions, and the verification walks them, on the device."""
    graphs = proposer.tree_graphs_by_size[size]
    full = [r for r, (_, seq) in enumerate(trees) if seq.draft_room >= size]
    if not full:
        return {}
    keys = [trees[r][0] for r in full]
    args = (
        torch.stack([roots[i] for i in keys]),
        torch.stack([root_hidden[i] for i in keys]) if root_hidden is not None else None,
        [base[r] for r in full],
        [trees[r][1].request.block_table for r in full],
    )
    on_device = len(full) == len(trees) and trees_stay_on_device(proposer, trees)
    return grow_in_graphs(proposer, graphs, keys, on_device, args)


def grow_in_graphs(
    proposer, graphs, keys: list[int], on_device: bool, args: tuple
) -> dict[int, list[int]] | DeviceDrafts:
    """Grow the trees of sequences ``keys`` with ``graphs.grow_on_device(*args)`` (their
    :class:`DeviceDrafts`, shape included) or ``graphs.grow(*args)`` (read back, parents
    into ``proposer.parents``)."""
    if on_device:
        tokens, parents, depths, ancestors = graphs.grow_on_device(*args)
        width = tokens.shape[1]
        return DeviceDrafts(keys, tokens, [width] * len(keys), parents, depths, ancestors)
    drafts = {}
    for i, (tokens, parents) in zip(keys, graphs.grow(*args), strict=True):
        drafts[i], proposer.parents[i] = tokens, parents
    return drafts


def trees_stay_on_device(proposer, trees) -> bool:
    """Whether draft trees may keep their shape on the device for the whole step. Not when
    a request needs the host to walk its drafts (a grammar, penalties), when its seeded
    draws or held-back stops (``min_tokens``) are laid out by depth on the host, when a
    sequence has more than its newest token to run before the drafts, or when other ranks
    take the step's host arrays."""
    if proposer.runner.channel is not None:
        return False
    for _, seq in trees:
        request = seq.request
        if (
            request.needs_host_tokens
            or draws_seeded(request)
            or request.num_output_tokens < request.params.min_tokens
            or seq.num_known_tokens != 1
        ):
            return False
    return True


def capture_drafting(
    proposer,
    calls: DraftModelCalls,
    max_tokens: int,
    max_seqs: int,
    hidden_width: int,
    capture: bool,
    pool,
) -> None:
    """A model-based proposer's graphs: its runner's step graphs (catch-ups, single draft
    steps, partial trees) and its whole-loop graphs, chains of ``num_tokens`` drafts or, with
    ``tree_topk`` (every sample then drafts a tree), trees of each size a step may take
    (:func:`tree_sizes`), for as many trees as fit ``max_tokens`` tokens a round (larger
    batches of trees run in several replays)."""
    runner = proposer.runner
    num_tokens, tree_topk, tree_size = proposer.num_tokens, proposer.tree_topk, proposer.tree_size
    runner.graphs = StepGraphs(
        runner,
        max_tokens,
        max_seqs,
        capture=capture,
        mixed=None if capture else True,  # the twin runs every layout (reference backend)
        trees=tree_topk > 0,
        hidden_width=hidden_width,
        pool=pool,
    )
    pool = runner.graphs.pool
    chains, trees = None, {}
    if num_tokens > 1 and not tree_topk:
        chains = ChainGraphs(
            runner, calls, num_tokens - 1, max_seqs, hidden_width, capture=capture, pool=pool
        )
        pool = chains.pool
    # Tree rounds are mixed-layout steps under a mask (the step graphs' ``mixed_ok``).
    if tree_topk > 0 and runner.graphs.mixed_ok and tree_topk < tree_size and num_tokens > 1:
        for size in tree_sizes(proposer, max_seqs):
            trees[size] = TreeGraphs(
                runner,
                calls,
                tree_topk,
                size,
                num_tokens,
                max(1, min(max_seqs, max_tokens // size)),
                hidden_width,
                capture=capture,
                pool=pool,
                # An EAGLE head's catch-up over a round's accepted tokens (at most the
                # drafts and the bonus token) runs in the tree's graph.
                catch_up=num_tokens + 1,
            )
            pool = trees[size].pool
    proposer.chain_graphs, proposer.tree_graphs_by_size = chains, trees


def build_proposer(
    spec: SpeculativeConfig,
    config: EngineConfig,
    target: ModelConfig,
    backend: AttentionBackend,
    num_blocks: int,
    max_model_len: int,
    target_model: torch.nn.Module | None = None,
    device: torch.device | None = None,
    tp: TensorParallel = SINGLE,
    channel: StepChannel | None = None,
) -> Proposer:
    """The proposer ``spec`` names. A draft model is checked against the target's tokenizer
    and gets a cache of its own over the target pool's block ids (plus the scratch block); an
    EAGLE head is checked against the target (``target_model``, whose embedding and
    ``lm_head`` it may share) and gets such a cache too, plus the store of target features
    it reads (:attr:`Proposer.hidden_store`, which the engine hands the target and its
    runner).

    Under tensor parallelism (``tp``, rank 0's place; ``channel``, rank 0's channel of the
    target's steps) a proposer whose model runs on every rank
    (:meth:`SpeculativeConfig.steps_on_every_rank`: the MTP layers, a draft model split like
    the target, an EAGLE head) sends each of its steps through the channel's draft twin
    before running its own part; the other ranks hold theirs
    (:mod:`engine_service.engine.spec.ranks`)."""
    if spec.method == "ngram":
        return NgramProposer(
            spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max
        )
    if spec.method == "mtp":
        from engine_service.engine.spec.mtp import build_mtp_proposer

        assert target_model is not None, "mtp drafts with the target's own layers"
        return build_mtp_proposer(
            spec.num_speculative_tokens,
            config,
            target,
            target_model,
            backend,
            num_blocks,
            max_model_len,
            tp,
            channel,
        )
    assert spec.model is not None
    device = device or torch.device(config.device)
    draft_channel = None
    if spec.steps_on_every_rank(tp.size) and channel is not None:
        draft_channel = channel.for_drafts()
    else:
        tp = SINGLE
    max_tokens = draft_max_tokens(config, max_model_len)
    if spec.method in ("eagle", "eagle3"):
        from engine_service.engine.spec.eagle import build_eagle_proposer  # builds on this module

        return build_eagle_proposer(
            spec,
            config,
            target,
            target_model,
            backend,
            num_blocks,
            max_model_len,
            device,
            draft_channel,
        )
    runner = load_draft_model(
        spec, config, backend, num_blocks, max_model_len, device, tp, draft_channel
    )
    check_same_tokenizer(
        resolve_model_path(config.model, config.revision),
        resolve_model_path(spec.model),
        target.vocab_size,
        runner.model.config.vocab_size,
    )
    logger.info(
        "speculative decoding: draft model %s, %d tokens%s",
        spec.model,
        spec.num_speculative_tokens,
        f", split over {tp.size} ranks" if tp.size > 1 else "",
    )
    return DraftModelProposer(
        runner,
        spec.num_speculative_tokens,
        max_tokens,
        spec.tree_topk,
        spec.tree_size,
        spec.tree_batch_tokens,
    )


def draft_max_tokens(config: EngineConfig, max_model_len: int) -> int:
    """The most tokens one draft forward takes: a sequence's first proposal feeds the draft
    its whole prompt in one pass."""
    return max(config.max_num_batched_tokens, max_model_len)


def load_draft_model(
    spec: SpeculativeConfig,
    config: EngineConfig,
    backend: AttentionBackend,
    num_blocks: int,
    max_model_len: int,
    device: torch.device,
    tp: TensorParallel = SINGLE,
    channel: StepChannel | None = None,
) -> ModelRunner:
    """The draft model ``spec`` names, split as ``tp`` says, and a runner over its cache
    (this rank's key/value heads); what every rank that holds a share runs. ``channel``:
    rank 0's, through which the runner sends its steps to the other shares."""
    assert spec.model is not None
    try:
        draft, draft_config, dtype = load_model(spec.model, backend, config.dtype, device, None, tp)
    except ValueError as exc:
        if tp.size == 1:
            raise
        raise ValueError(
            f"the draft model does not split over tensor-parallel size {tp.size}: {exc}; "
            'give "draft_tensor_parallel_size": 1 to keep it whole on the first rank'
        ) from exc
    return draft_runner(
        draft,
        draft_config,
        dtype,
        backend,
        config,
        num_blocks,
        max_model_len,
        draft_max_tokens(config, max_model_len),
        custom_masks=spec.tree_size > 0,
        device=device,
        tp_size=tp.size,
        channel=channel,
    )


def draft_runner(
    draft: torch.nn.Module,
    mc: ModelConfig,
    dtype: torch.dtype,
    backend: AttentionBackend,
    config: EngineConfig,
    num_blocks: int,
    max_model_len: int,
    max_tokens: int,
    custom_masks: bool = False,
    device: torch.device | None = None,
    tp_size: int = 1,
    channel: StepChannel | None = None,
) -> ModelRunner:
    """A runner over a draft's (or head's) own KV cache, indexed by the target's block ids;
    ``custom_masks``: it drafts token trees (its kernels' mask variants compile at start);
    ``tp_size``: the draft is split over that many ranks (each caches its own heads)."""
    cache = torch.zeros(
        (num_blocks + 1, *rank_kv_block_shape(mc, config.block_size, tp_size)),
        dtype=dtype,
        device=device or torch.device(config.device),
    )
    return ModelRunner(
        draft,
        backend,
        cache,
        config.block_size,
        max_num_tokens=max_tokens,
        max_num_seqs=config.max_num_seqs,
        max_blocks_per_seq=-(-max_model_len // config.block_size),
        scratch_block=num_blocks,
        channel=channel,
        tp_size=tp_size,
        custom_masks=custom_masks,
    )
