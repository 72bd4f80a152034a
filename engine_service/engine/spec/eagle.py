"""The EAGLE proposer: a one-layer head drafts from the target's own hidden states.

The target writes the features the head reads into a per-slot store during its forward
pass (:mod:`engine_service.models.hidden_states`). The head's KV cache is its own tensor
indexed by the target's block tables and slots, like a draft model's, so rejected drafts
need no undo: their entries are recomputed when the position is fed again.

At a proposal, a sequence has ``n`` known tokens, of which the target computed ``n - 1``
(the newest waits in this step). Head position ``p`` reads (token ``p + 1``, the target's
feature of ``p``), so the head catches up on positions ``[fed, n - 1)``::

    tokens     t0   t1   t2  ...  t(n-2)  t(n-1)         known; t(n-1) not computed yet
    features   f0   f1   f2  ...  f(n-2)                 the target's, from the store
    head at p  (t1,f0) (t2,f1) ... (t(n-1),f(n-2))  ──▶  root: logits for t(n), output o
    chain      (d1,o) at n-1 ──▶ d2, (d2,o1) at n ──▶ d3 ...   each its parent's output

After verification the accepted tokens' features are in the store (an accepted tree path
moved there with its KV), and the next proposal feeds exactly those positions.

One approximation: the head's entry at position ``p`` depends on token ``p + 1``, so in a
block shared by requests that go on differently (a prefix hit, two equal prompts merged,
``n`` samples of a prompt ending on a block boundary) the block's last entry is the one the
last writer computed. Its siblings then draft from one slightly wrong key, which costs a
little acceptance and never changes an output (verification decides).

Trees (``tree_topk``) grow as the draft model's do (EAGLE-2: by path probability), except
that a node's hidden input is its parent's output, so the tree runs one round at a time:
every round runs all nodes so far under the tree mask (the earlier ones recompute what they
computed before) and expands the newest.

Several ranks. Under tensor parallelism every rank holds the head's layers whole and runs
each head step (:func:`run_head`): the target's hidden states are whole on every rank after
each layer's all-reduce, so each rank's feature store holds the same rows, and the target's
vocabulary-parallel embedding (summed over the ranks) and ``lm_head`` (gathered on the first
rank) work as in the target's own forward. Rank 0 decides alone: it sends each head step
with the hidden rows it feeds back (its own outputs), reads the gathered logits and picks the
drafts. Under data-parallel attention each rank drafts for its own batch from its own
features: rank 0 keeps a remote proposer per other rank (:meth:`EagleProposer.for_peer`)
whose head steps run in that rank's process and send back their logits and output rows.

CUDA graphs (:meth:`EagleProposer.capture_graphs`): catch-ups and tree rounds replay the
head's step graphs, whose static hidden-input buffer takes the rows the head reads (the
target's features, or its own outputs); a greedy chain's drafts after the first are one
replay of :class:`~engine_service.engine.spec.graphs.ChainGraphs`, each step's output row
and argmax feeding the next on the device, and a full-size tree's rounds one replay of
:class:`~engine_service.engine.spec.graphs.TreeGraphs`.
"""

from __future__ import annotations

import logging

import torch

from engine_service.engine.batch import DeviceDrafts, ScheduledBatch, ScheduledSequence, tree_mask
from engine_service.engine.config import EngineConfig
from engine_service.engine.model_runner import ModelRunner, StepInputs
from engine_service.engine.parallel.channel import StepChannel
from engine_service.engine.request import Request
from engine_service.engine.spec.config import SpeculativeConfig
from engine_service.engine.spec.graphs import ChainGraphs, DraftModelCalls, TreeGraphs, greedy_ids
from engine_service.engine.spec.proposers import (
    Proposer,
    _Tree,
    capture_drafting,
    chain_drafts,
    draft_max_tokens,
    draft_runner,
    grow_full_trees,
    grow_in_graphs,
    trees_stay_on_device,
)
from engine_service.layers.paged_attention import AttentionBackend
from engine_service.models.config import ModelConfig
from engine_service.models.eagle import EagleHead, load_eagle_head
from engine_service.models.hidden_states import HiddenStateStore
from engine_service.models.loader import resolve_dtype, resolve_model_path

logger = logging.getLogger(__name__)


class EagleProposer(Proposer):
    def __init__(
        self,
        head: EagleHead,
        runner: ModelRunner,
        hidden_store: HiddenStateStore,
        num_tokens: int,
        max_tokens: int,
        tree_topk: int = 0,
        tree_size: int = 0,
        tree_batch_tokens: int = 0,
    ) -> None:
        self.head = head
        # Builds the head's step inputs; its cache is the head's KV. A remote runner (data
        # parallel): the head, its KV and the features are another rank's.
        self.runner = runner
        self.hidden_store = hidden_store  # None with a remote runner
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens
        self.tree_topk = tree_topk
        self.tree_size = tree_size
        self.tree_batch_tokens = tree_batch_tokens  # see step_tree_size
        self.parents: dict[int, list[int]] = {}
        # id(request) -> (request, its preemption count, head positions fed)
        self._fed: dict[int, tuple[Request, int, int]] = {}
        self.chain_graphs: ChainGraphs | None = None  # chains after the first draft
        # Trees after the root, by tree size (one size unless trees shrink in large batches).
        self.tree_graphs_by_size: dict[int, TreeGraphs] = {}

    @property
    def tree_graphs(self) -> TreeGraphs | None:
        """The graphs of full-size trees."""
        return self.tree_graphs_by_size.get(self.tree_size)

    def tree_parents(self) -> dict[int, list[int]]:
        return self.parents

    def for_peer(self, channel: StepChannel) -> Proposer:
        return EagleProposer(
            self.head,
            self.runner.remote_twin(channel),
            None,
            self.num_tokens,
            self.max_tokens,
            self.tree_topk,
            self.tree_size,
            self.tree_batch_tokens,
        )

    def capture_graphs(
        self, max_tokens: int, max_seqs: int, pool=None, capture: bool = True
    ) -> None:
        runner, width = self.runner, self.head.config.hidden_size
        head, cache, store = self.head, runner.kv_cache, self.hidden_store
        calls = DraftModelCalls(
            forward=lambda ids, positions, hidden, meta: head(ids, positions, hidden, cache, meta),
            logits=head.compute_logits,
            to_target=head.draft_to_target,
            features=(lambda slots: head.project(store.read(slots))) if store else None,
        )
        capture_drafting(self, calls, max_tokens, max_seqs, width, capture, pool)

    @torch.inference_mode()
    def propose(self, batch: ScheduledBatch) -> dict[int, list[int]] | DeviceDrafts:
        self.parents = {}
        # A sequence whose first token is still to be computed has no feature to start from.
        chosen = [(i, s) for i, s in enumerate(batch.sequences) if s.draft_room and s.start]
        if not chosen:
            return {}
        if self.tree_topk:
            grown = self._trees_with_catch_up(chosen, batch.tree_size)
            if grown is not None:
                return grown
        roots = self._catch_up(chosen)
        if self.tree_topk:
            return self._trees(chosen, roots, batch.tree_size)
        return self._chains(chosen, roots)

    def _catch_up_spans(self, chosen) -> list[tuple[int, list[int]]]:
        """Per sequence, what the head is fed before its drafts: the first cache index and
        the tokens from there (each position takes the next token)."""
        spans = []
        for _, seq in chosen:
            request = seq.request
            computed = seq.start  # n - 1: the newest token runs in this step
            seen, epoch, fed = self._fed.get(id(request), (None, -1, 0))
            if seen is not request or epoch != request.num_preemptions:
                fed = 0
            fed = min(fed, computed - 1)  # at least the last position, for its logits
            spans.append((fed, request.all_token_ids[fed + 1 : computed + 1]))
        return spans

    def _mark_fed(self, chosen) -> None:
        self._fed = {k: v for k, v in self._fed.items() if not v[0].is_finished}
        for _, seq in chosen:
            self._fed[id(seq.request)] = (seq.request, seq.request.num_preemptions, seq.start)

    def _trees_with_catch_up(self, trees, size: int) -> dict[int, list[int]] | DeviceDrafts | None:
        """Every tree of the step grown by one launch of its graph, the head's catch-up
        over the newest tokens included; None (nothing done) unless every tree gets the
        step's full size and every catch-up fits the graph's rows (a prompt's does not)."""
        graphs = self.tree_graphs_by_size.get(size or self.tree_size)
        if graphs is None or not graphs.catch_up:
            return None
        if any(seq.draft_room < graphs.size for _, seq in trees):
            return None
        tokens = [fed_tokens for _, fed_tokens in self._catch_up_spans(trees)]
        if any(len(fed_tokens) > graphs.catch_up for fed_tokens in tokens):
            return None
        args = (
            None,
            None,
            [seq.start for _, seq in trees],
            [seq.request.block_table for _, seq in trees],
            (tokens, [len(fed_tokens) for fed_tokens in tokens]),
        )
        self._mark_fed(trees)
        keys = [i for i, _ in trees]
        return grow_in_graphs(self, graphs, keys, trees_stay_on_device(self, trees), args)

    def _catch_up(self, chosen) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Feed each sequence's positions the head has not seen; per sequence the root's
        (logits, output) rows."""
        pieces = []
        for (i, seq), (fed, shifted) in zip(chosen, self._catch_up_spans(chosen), strict=True):
            pieces.append(
                (i, ScheduledSequence(seq.request, fed, len(shifted), 1, draft_token_ids=shifted))
            )
        out = self._forward(pieces, None)
        self._mark_fed(chosen)
        return {i: (logits[0], hidden[0]) for i, (logits, hidden) in out.items()}

    def _chains(self, chains, roots) -> dict[int, list[int]] | DeviceDrafts:
        """Greedy chains, one batched head forward per token after the first."""
        if self.chain_graphs is not None:
            # Draft r (r >= 2) is computed at the head's position start + r - 2.
            return chain_drafts(
                self.chain_graphs,
                chains,
                greedy_ids(
                    torch.stack([roots[i][0] for i, _ in chains]), self.head.draft_to_target
                ),
                torch.stack([roots[i][1] for i, _ in chains]),
                [seq.start for _, seq in chains],
                [min(seq.draft_room, self.num_tokens) for _, seq in chains],
            )
        drafts = {i: [self._token(roots[i][0].argmax())] for i, _ in chains}
        hidden = {i: roots[i][1] for i, _ in chains}
        depth = {i: min(seq.draft_room, self.num_tokens) for i, seq in chains}
        for j in range(1, max(depth.values())):
            active = [(i, seq) for i, seq in chains if j < depth[i]]
            if not active:
                break
            pieces = [
                (
                    i,
                    ScheduledSequence(
                        seq.request, seq.start - 1 + j, 1, 1, draft_token_ids=[drafts[i][-1]]
                    ),
                )
                for i, seq in active
            ]
            out = self._forward(pieces, [hidden[i][None] for i, _ in active])
            for i, _ in active:
                logits, row = out[i]
                drafts[i].append(self._token(logits[0].argmax()))
                hidden[i] = row[0]
        return drafts

    def _trees(self, trees, roots, size: int = 0) -> dict[int, list[int]] | DeviceDrafts:
        """Token trees by confidence; node ``m``'s hidden input is its parent's output."""
        drafts: dict[int, list[int]] = {}
        step_size = size or self.tree_size  # size: the scheduler's, under a tree budget
        if step_size in self.tree_graphs_by_size:
            logits = {i: root[0] for i, root in roots.items()}
            hidden = {i: root[1] for i, root in roots.items()}
            base = [seq.start for _, seq in trees]
            grown_full = grow_full_trees(self, trees, base, logits, hidden, step_size)
            if isinstance(grown_full, DeviceDrafts):
                return grown_full
            drafts = grown_full
            trees = [(i, seq) for i, seq in trees if i not in drafts]
        grown: dict[int, _Tree] = {}
        outputs: dict[int, list[torch.Tensor]] = {}  # per tree: output of node m at m - 1
        for i, seq in trees:
            size = min(seq.draft_room, step_size)
            top = roots[i][0].log_softmax(-1).topk(min(self.tree_topk, size))
            grown[i] = _Tree(size, self._tokens(top.indices), top.values.tolist())
            outputs[i] = []
        for _ in range(1, self.num_tokens):
            active = [(i, seq) for i, seq in trees if grown[i].growing]
            if not active:
                break
            pieces, hidden_in = [], []
            for i, seq in active:
                tree = grown[i]
                mask, depths = tree_mask(tree.parents)
                size = len(tree.tokens)
                # Node m's slot is the root's + m, its rotary position the root's + depth;
                # the newest nodes (the frontier) come last and give the logits.
                pieces.append(
                    (
                        i,
                        ScheduledSequence(
                            seq.request,
                            seq.start,
                            size,
                            len(tree.frontier),
                            draft_token_ids=list(tree.tokens),
                            custom_mask=mask[1:, 1:],
                            position_offsets=[depths[m] - m for m in range(1, size + 1)],
                        ),
                    )
                )
                parents_out = [roots[i][1] if p == 0 else outputs[i][p - 1] for p in tree.parents]
                hidden_in.append(torch.stack(parents_out))
            out = self._forward(pieces, hidden_in)
            for i, _ in active:
                logits, rows = out[i]
                outputs[i].extend(rows.unbind(0))  # the frontier's outputs, in node order
                grown[i].extend(logits.log_softmax(-1), self.tree_topk, self._tokens)
        for i, _ in trees:
            self.parents[i] = grown[i].parents
        return drafts | {i: grown[i].tokens for i, _ in trees}

    def _token(self, index: torch.Tensor) -> int:
        return self._tokens(index.reshape(1))[0]

    def _tokens(self, indices: torch.Tensor) -> list[int]:
        """Head vocabulary rows to target token ids (EAGLE-3's reduced vocabulary)."""
        if self.head.draft_to_target is not None:
            indices = self.head.draft_to_target[indices]
        return indices.tolist()

    def _forward(
        self, pieces, hidden_in: list[torch.Tensor] | None
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Run the head on ``(key, sequence)`` pairs, in forwards of at most ``max_tokens``.
        ``hidden_in[j]`` is the hidden input of pair ``j``'s rows; ``None``: the target's
        features at the rows' slots. Returns, per key, the last ``num_logits`` rows' logits
        (fp32, the head's vocabulary) and outputs."""
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        start = 0
        while start < len(pieces):
            stop, total = start, 0
            while stop < len(pieces) and (
                stop == start or total + pieces[stop][1].num_tokens <= self.max_tokens
            ):
                total += pieces[stop][1].num_tokens
                stop += 1
            group = pieces[start:stop]
            batch = ScheduledBatch()
            for _, sequence in group:
                batch.sequences.append(sequence)
                batch.num_tokens += sequence.num_tokens
                batch.num_logits += sequence.num_logits
            inputs = self.runner.prepare(batch)
            hidden = None if hidden_in is None else torch.cat(hidden_in[start:stop])
            rows, logits = self._execute(batch, inputs, hidden)
            first = 0
            for key, sequence in group:
                last = first + sequence.num_logits
                out[key] = (logits[first:last], rows[first:last])
                first = last
            start = stop
        return out

    def _execute(
        self, batch: ScheduledBatch, inputs: StepInputs, hidden: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One head step here, on every tensor-parallel rank, or on the data-parallel rank
        this proposer drafts for; its (output rows, fp32 logits) at the logits rows."""
        channel = self.runner.channel
        if channel is not None:
            assert inputs.broadcast is not None
            channel.send_step(*inputs.broadcast, inputs.input_ids, hidden=hidden)
            if self.runner.remote:
                logits = channel.recv_logits(batch.num_logits, self.head.draft_vocab_size)
                rows = channel.recv_logits(batch.num_logits, self.head.config.hidden_size)
                return rows.to(self.head.dtype), logits
        rows, logits = run_head(self.head, self.runner, self.hidden_store, inputs, hidden)
        assert logits is not None  # the first rank's
        return rows, logits


@torch.inference_mode()
def run_head(
    head: EagleHead,
    runner: ModelRunner,
    store: HiddenStateStore | None,
    inputs: StepInputs,
    hidden: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward of ``head`` over prepared ``inputs``, as every rank that holds it runs it:
    the hidden input is ``hidden`` (``[T, H]``, the outputs fed back) or, when ``None``, the
    target's features at the step's slots in ``store``. Returns the output rows at the
    logits rows and their fp32 logits over the head's vocabulary (``None`` on ranks other
    than the first when the head shares the target's vocabulary-parallel ``lm_head``)."""
    if hidden is None:
        assert store is not None
        hidden = head.project(store.read(inputs.meta.slot_mapping))
    if runner.graphs is not None and runner.graphs.fits(inputs):  # one rank: its graphs
        rows = runner.graphs.replay(inputs.input_ids, inputs, hidden)
    else:
        runner.backend.prepare(inputs.meta, runner.block_size)
        rows = head(
            inputs.input_ids, inputs.positions, hidden.to(head.dtype), runner.kv_cache, inputs.meta
        )
    rows = rows[inputs.logits_indices]
    logits = head.compute_logits(rows)
    return rows, logits.float() if logits is not None else None


def load_eagle_head_runner(
    spec: SpeculativeConfig,
    config: EngineConfig,
    target: ModelConfig,
    target_model: torch.nn.Module,
    backend: AttentionBackend,
    num_blocks: int,
    max_model_len: int,
    device: torch.device,
    channel: StepChannel | None = None,
) -> tuple[EagleHead, HiddenStateStore, ModelRunner]:
    """The head ``spec`` names for ``target_model``, the store of target features it reads
    (which the target must be told to keep), and a runner over the head's own KV cache; what
    every rank that holds the head builds. ``channel``: rank 0's, for the head's steps."""
    if not hasattr(target_model, "keep_hidden_states"):
        raise ValueError(
            f"the target architecture {target.architecture} cannot feed an EAGLE head "
            "(it does not expose its hidden states)"
        )
    assert spec.model is not None
    dtype = resolve_dtype(config.dtype, target.torch_dtype)
    version = 3 if spec.method == "eagle3" else 1
    head = load_eagle_head(
        resolve_model_path(spec.model), version, target_model, target, backend, dtype, device
    )
    store = head.feature_store(target, num_blocks, config.block_size, dtype, device)
    runner = draft_runner(
        head,
        head.config,
        dtype,
        backend,
        config,
        num_blocks,
        max_model_len,
        draft_max_tokens(config, max_model_len),
        custom_masks=spec.tree_size > 0,
        device=device,
        channel=channel,
    )
    return head, store, runner


def build_eagle_proposer(
    spec: SpeculativeConfig,
    config: EngineConfig,
    target: ModelConfig,
    target_model: torch.nn.Module | None,
    backend: AttentionBackend,
    num_blocks: int,
    max_model_len: int,
    device: torch.device,
    channel: StepChannel | None = None,
) -> EagleProposer:
    """Load the head ``spec`` names and check it against the target; the proposer's
    ``hidden_store`` is what the engine must have the target keep."""
    if target_model is None:
        raise ValueError(
            f"the target architecture {target.architecture} cannot feed an EAGLE head "
            "(it does not expose its hidden states)"
        )
    head, store, runner = load_eagle_head_runner(
        spec, config, target, target_model, backend, num_blocks, max_model_len, device, channel
    )
    logger.info(
        "speculative decoding: EAGLE-%d head %s, %d tokens",
        3 if spec.method == "eagle3" else 1,
        spec.model,
        spec.num_speculative_tokens,
    )
    return EagleProposer(
        head,
        runner,
        store,
        spec.num_speculative_tokens,
        draft_max_tokens(config, max_model_len),
        spec.tree_topk,
        spec.tree_size,
        spec.tree_batch_tokens,
    )
