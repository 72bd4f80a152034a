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
"""

from __future__ import annotations

import logging

import torch

from engine_service.engine.batch import ScheduledBatch, ScheduledSequence, tree_mask
from engine_service.engine.config import EngineConfig
from engine_service.engine.model_runner import ModelRunner
from engine_service.engine.request import Request
from engine_service.engine.spec.config import SpeculativeConfig
from engine_service.engine.spec.proposers import Proposer, _Tree, draft_runner
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
    ) -> None:
        self.head = head
        self.runner = runner  # builds the head's step inputs; its cache is the head's KV
        self.hidden_store = hidden_store
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens
        self.tree_topk = tree_topk
        self.tree_size = tree_size
        self.parents: dict[int, list[int]] = {}
        # id(request) -> (request, its preemption count, head positions fed)
        self._fed: dict[int, tuple[Request, int, int]] = {}

    def tree_parents(self) -> dict[int, list[int]]:
        return self.parents

    @torch.inference_mode()
    def propose(self, batch: ScheduledBatch) -> dict[int, list[int]]:
        self.parents = {}
        # A sequence whose first token is still to be computed has no feature to start from.
        chosen = [(i, s) for i, s in enumerate(batch.sequences) if s.draft_room and s.start]
        if not chosen:
            return {}
        roots = self._catch_up(chosen)
        if self.tree_topk:
            return self._trees(chosen, roots)
        return self._chains(chosen, roots)

    def _catch_up(self, chosen) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Feed each sequence's positions the head has not seen; per sequence the root's
        (logits, output) rows."""
        pieces = []
        for i, seq in chosen:
            request = seq.request
            computed = seq.start  # n - 1: the newest token runs in this step
            seen, epoch, fed = self._fed.get(id(request), (None, -1, 0))
            if seen is not request or epoch != request.num_preemptions:
                fed = 0
            fed = min(fed, computed - 1)  # at least the last position, for its logits
            shifted = request.all_token_ids[fed + 1 : computed + 1]
            pieces.append(
                (i, ScheduledSequence(request, fed, len(shifted), 1, draft_token_ids=shifted))
            )
        out = self._forward(pieces, None)
        self._fed = {k: v for k, v in self._fed.items() if not v[0].is_finished}
        for _, seq in chosen:
            self._fed[id(seq.request)] = (seq.request, seq.request.num_preemptions, seq.start)
        return {i: (logits[0], hidden[0]) for i, (logits, hidden) in out.items()}

    def _chains(self, chains, roots) -> dict[int, list[int]]:
        """Greedy chains, one batched head forward per token after the first."""
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

    def _trees(self, trees, roots) -> dict[int, list[int]]:
        """Token trees by confidence; node ``m``'s hidden input is its parent's output."""
        grown: dict[int, _Tree] = {}
        outputs: dict[int, list[torch.Tensor]] = {}  # per tree: output of node m at m - 1
        for i, seq in trees:
            size = min(seq.draft_room, self.tree_size)
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
        return {i: grown[i].tokens for i, _ in trees}

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
            if hidden_in is None:
                hidden = self.head.project(self.hidden_store.read(inputs.meta.slot_mapping))
            else:
                hidden = torch.cat(hidden_in[start:stop])
            runner = self.runner
            runner.backend.prepare(inputs.meta, runner.block_size)
            rows = self.head(
                inputs.input_ids, inputs.positions, hidden, runner.kv_cache, inputs.meta
            )
            rows = rows[inputs.logits_indices]
            logits = self.head.compute_logits(rows).float()
            first = 0
            for key, sequence in group:
                last = first + sequence.num_logits
                out[key] = (logits[first:last], rows[first:last])
                first = last
            start = stop
        return out


def build_eagle_proposer(
    spec: SpeculativeConfig,
    config: EngineConfig,
    target: ModelConfig,
    target_model: torch.nn.Module | None,
    backend: AttentionBackend,
    num_blocks: int,
    max_model_len: int,
    max_tokens: int,
) -> EagleProposer:
    """Load the head ``spec`` names and check it against the target; the proposer's
    ``hidden_store`` is what the engine must have the target keep."""
    if target_model is None or not hasattr(target_model, "keep_hidden_states"):
        raise ValueError(
            f"the target architecture {target.architecture} cannot feed an EAGLE head "
            "(it does not expose its hidden states)"
        )
    if config.tensor_parallel_size > 1:
        raise ValueError("EAGLE heads under tensor parallelism are not supported yet")
    assert spec.model is not None
    device = torch.device(config.device)
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
        max_tokens,
        custom_masks=spec.tree_size > 0,
    )
    logger.info(
        "speculative decoding: EAGLE-%d head %s, %d tokens",
        version,
        spec.model,
        spec.num_speculative_tokens,
    )
    return EagleProposer(
        head, runner, store, spec.num_speculative_tokens, max_tokens, spec.tree_topk, spec.tree_size
    )
