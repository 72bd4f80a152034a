"""CUDA graphs of a proposer's whole drafting loop: a greedy chain's drafts after the first,
or a token tree's growth after the root, for a whole batch in one replay.

The first draft (or the root's children) comes from the proposer's catch-up forward, a step
of its :class:`~engine_service.engine.cuda_graphs.StepGraphs`. What follows needs nothing
from the host: every input of every later step is derived on the device, and the argmax or
the tree's choice of new nodes feeds the next step directly.

Chains (:class:`ChainGraphs`), ``num_steps`` one-token steps::

    row b, step j (0-based)   cache index  p = base[b] + j
                              slot         block_tables[b, p // block_size] * block_size
                                           + p % block_size         (scratch once j >= depth[b])
                              context      p + 1 keys
                              input        step j - 1's draft (j = 0: the first draft) and,
                                           for an EAGLE head, step j - 1's output row
    out[b, j] = the argmax of step j's logits, as a target id

Trees (:class:`TreeGraphs`) grow as EAGLE-2 does and as the proposers' host code does
(:class:`~engine_service.engine.spec.proposers._Tree`): each round runs every node so far
under the tree's ancestor mask and adds the ``topk`` best children of the newest nodes by
path log-probability. A round's node count is fixed by ``topk``, the tree size and the depth
limit, so the rounds unroll into one graph. Node ``m`` (1-based) of row ``b`` sits at cache
index ``base[b] + m - 1`` with rotary position ``base[b] - 1 + depth(m)``; an EAGLE head
reads its parent's output row (node 0: the root's). Path scores add in float64, as the host
adds Python floats, and ties order as the host's tuple sort does (score, then node, then
token, all descending), so the trees are the host's exactly.

One graph per batch bucket (padded like the decode buckets of the target's graphs). A
round's host work is writing the rows' bases and block tables once, one replay and one read
of the result. Padding rows, and chain rows past their own depth, keep running but write
their K/V into the scratch block and read only valid blocks: what they draft is never read.

The steps' attention metadata is built inside the graph, so the backend's
``prepare_for_capture`` runs once per step shape and ``prepare_for_replay`` (a refresh from a
host-built step) is never called: the Triton backend needs neither.

With ``capture=False`` the same steps run eagerly on the same static buffers, preparing the
backend each step: the CPU twin that tests the derivation and padding without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine_service.engine.cuda_graphs import _BUCKETS
from engine_service.layers.paged_attention import AttentionMetadata

if TYPE_CHECKING:
    from engine_service.engine.model_runner import ModelRunner


@dataclass(slots=True)
class DraftModelCalls:
    """How a proposer's model drafts: ``forward(token ids [T], positions [T], hidden rows
    [T, H] or None, metadata)`` to output rows ``[T, H]`` (over the runner's KV cache);
    ``logits(rows)`` over the proposer's vocabulary; ``to_target`` maps a reduced vocabulary
    to target ids (EAGLE-3's ``d2t``), None when they are the same."""

    forward: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor | None, AttentionMetadata], torch.Tensor
    ]
    logits: Callable[[torch.Tensor], torch.Tensor]
    to_target: torch.Tensor | None = None
    # An EAGLE head's hidden input at cache slots (the target's kept features, projected):
    # lets a tree graph run the head's catch-up over the accepted tokens itself.
    features: Callable[[torch.Tensor], torch.Tensor] | None = None

    def target_ids(self, index: torch.Tensor) -> torch.Tensor:
        return self.to_target[index] if self.to_target is not None else index


def greedy_ids(logits: torch.Tensor, to_target: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's argmax, as target token ids (``to_target``: a reduced draft vocabulary's
    map). The tensor form of what the eager chains take with ``int(row.argmax())``."""
    index = logits.argmax(dim=-1)
    return to_target[index] if to_target is not None else index


class _DraftGraphs:
    """What chain and tree graphs share: the batch buckets, the rows' base cache indices,
    one more integer per row and block tables (staged on the host, copied once per run),
    capture and replay. ``row_columns``: integers more per row that a subclass stages (its
    :attr:`row_staging`)."""

    def __init__(
        self,
        runner: ModelRunner,
        calls: DraftModelCalls,
        max_seqs: int,
        capture: bool,
        pool,
        row_columns: int = 0,
    ) -> None:
        self.runner = runner
        self.calls = calls
        self.max_seqs = max_seqs
        self.capture = capture
        self.pool = pool
        self.buckets = sorted({b for b in _BUCKETS if b < max_seqs} | {max_seqs})
        self.replays = 0
        device = runner.device
        width = runner.max_blocks_per_seq
        self.scratch_slot = runner.scratch_block * runner.block_size
        # The graphs' integer inputs, one buffer so that a run stages them in one copy:
        # each row's base cache index, one more integer (``extra``: :attr:`row_extra`), then
        # ``row_columns`` more a row (the subclass's :attr:`row_staging`).
        s = max_seqs
        inputs = torch.zeros(s * (2 + row_columns), dtype=torch.int64, device=device)
        self._inputs = inputs
        self.base, self.row_extra = inputs[:s], inputs[s : 2 * s]
        self.row_staging = inputs[2 * s :].view(s, row_columns)
        self.tables = torch.full((s, width), runner.scratch_block, dtype=torch.int32, device=device)
        # Host staging (pinned on CUDA) of the same layout, and of the tables as far as a
        # run needs them (``[bucket, width]``, packed; on CUDA through a device buffer of
        # that layout). One set: a run's copies out of it are recorded, and the next run
        # waits for them before writing here again (runs of one step, e.g. trees that stay
        # on the device for more rows than the largest bucket, have no read-back between
        # them).
        pin = device.type == "cuda"
        self._host_inputs = torch.zeros(inputs.numel(), dtype=torch.int64, pin_memory=pin)
        self._host_tables = torch.zeros(s * width, dtype=torch.int32, pin_memory=pin)
        self._device_tables = torch.zeros(s * width, dtype=torch.int32, device=device)
        host = self._host_inputs.numpy()
        self._host_rows = host[: 2 * s].reshape(2, s)  # numpy views, made once
        self._host_row_staging = host[2 * s :].reshape(s, row_columns)
        self._host_table_flat = self._host_tables.numpy()
        self._staged_shape = (0, 0)  # the bucket and table width staged
        self._staged = torch.cuda.Event() if pin else None
        self._graphs: dict[int, torch.cuda.CUDAGraph | None] = {}
        # Per bucket, the metadata of each step the loop runs (the subclass builds them).
        self._step_metas: dict[int, list[AttentionMetadata]] = {}

    def _bucket(self, num_seqs: int) -> int:
        return next(b for b in self.buckets if b >= num_seqs)

    def _stage(
        self, bucket: int, base: list[int], extra: list[int], tables: list[list[int]], last: int
    ) -> None:
        """Stage the rows' ``base`` cache indices, one more integer per row (``extra``, into
        row 1 of the staging, for the subclass) and block tables up to cache index ``last``
        on the host, for :meth:`_launch` to copy; padding rows get base 0 and the scratch
        block. The subclass stages its own columns after this."""
        n, size = len(base), self.runner.block_size
        if self._staged is not None:
            self._staged.synchronize()  # the last run's copies have left the staging
        rows = self._host_rows
        rows[0, :n], rows[1, :n] = base, extra
        rows[:, n:bucket] = 0
        # Columns past ``last``'s block keep what an earlier run left: never live.
        width = min(last // size + 1, self.tables.shape[1])
        packed = self._host_table_flat[: bucket * width].reshape(bucket, width)
        packed.fill(self.runner.scratch_block)
        for row, table in enumerate(tables):
            table = table[:width]
            packed[row, : len(table)] = table
        self._staged_shape = (bucket, width)

    def _upload(self) -> None:
        """The staged integers in one copy, the staged tables in one more (on CUDA, and
        from the device buffer into the tables' rows)."""
        bucket, width = self._staged_shape
        area = bucket * width
        if self.runner.device.type == "cpu":  # the twins: host buffers both
            self._inputs.copy_(self._host_inputs)
            self.tables[:bucket, :width].copy_(self._host_tables[:area].view(bucket, width))
            return
        self._inputs.copy_(self._host_inputs, non_blocking=True)
        staged = self._device_tables[:area]
        staged.copy_(self._host_tables[:area], non_blocking=True)
        self.tables[:bucket, :width].copy_(staged.view(bucket, width))

    def _slots(self, index: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Slots of cache indices ``index`` ``[B, n]`` through the rows' block tables (a
        column past the table's width is clamped: such a row's slot is never live)."""
        size, width = self.runner.block_size, tables.shape[1]
        column = torch.clamp(index // size, max=width - 1)
        return tables.gather(1, column).long() * size + index % size

    def _meta(self, bucket: int, num_tokens: int, max_query_len: int, **buffers):
        runner, host = self.runner, not self.capture  # the twin's buffers are host tensors
        query_start, seq_lens = buffers["query_start"], buffers["seq_lens"]
        return AttentionMetadata(
            num_tokens=num_tokens,
            num_seqs=bucket,
            max_query_len=max_query_len,
            max_seq_len=runner.max_blocks_per_seq * runner.block_size,
            query_start_loc=query_start,
            seq_lens=seq_lens,
            positions=buffers["positions"],
            slot_mapping=buffers["slots"],
            block_tables=self.tables[:bucket],
            query_start_loc_host=query_start
            if host
            else torch.zeros(bucket + 1, dtype=torch.int32),
            seq_lens_host=seq_lens if host else torch.zeros(bucket, dtype=torch.int32),
            custom_mask=buffers.get("mask"),
            custom_mask_offsets=buffers.get("mask_offsets"),
        )

    # -- capture and replay ---------------------------------------------------------------

    def _body(self, bucket: int, prepare: bool) -> None:
        """The drafting loop over the static buffers of ``bucket``: what a graph captures
        (``prepare``: the twin, which prepares the backend before each step)."""
        raise NotImplementedError

    # The loop's forms, one graph each per bucket (trees: with and without a catch-up);
    # ``_variant`` is the one the next ``_body`` or ``_launch`` runs.
    _variants: tuple[bool, ...] = (False,)
    _variant = False

    def _launch(self, bucket: int) -> None:
        self._upload()
        if self._staged is not None:
            self._staged.record()  # after this run's copies from the staging
        self.replays += 1
        graph = self._graphs[(bucket, self._variant)]
        if graph is None:
            self._body(bucket, prepare=True)
        else:
            graph.replay()

    def _capture_metas(self, bucket: int) -> list[AttentionMetadata]:
        return self._step_metas[bucket]

    @torch.inference_mode()
    def _capture_all(self) -> None:
        keys = [(bucket, variant) for bucket in self.buckets for variant in self._variants]
        if not self.capture:
            self._graphs = dict.fromkeys(keys)
            return
        runner, pool = self.runner, self.pool
        # The rows start empty (base 0, scratch tables): warm-ups write only into scratch.
        for bucket, variant in reversed(keys):
            self._variant = variant
            for meta in self._capture_metas(bucket):
                runner.backend.prepare_for_capture(meta, runner.block_size)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._body(bucket, prepare=False)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._body(bucket, prepare=False)
            pool = graph.pool()
            self._graphs[(bucket, variant)] = graph
        self._variant = False
        self.pool = pool
        torch.cuda.synchronize()


class ChainGraphs(_DraftGraphs):
    """``num_steps`` greedy draft steps for up to ``max_seqs`` sequences; ``hidden_width``:
    the rows an EAGLE head feeds back (0: none, a draft model)."""

    def __init__(
        self,
        runner: ModelRunner,
        calls: DraftModelCalls,
        num_steps: int,
        max_seqs: int,
        hidden_width: int = 0,
        capture: bool = True,
        pool=None,
    ) -> None:
        assert num_steps >= 1
        super().__init__(runner, calls, max_seqs, capture, pool)
        self.num_steps = num_steps
        device = runner.device
        int64 = dict(dtype=torch.int64, device=device)
        self.tokens = torch.zeros(max_seqs, **int64)
        self.hidden = None
        if hidden_width:
            dtype = next(runner.model.parameters()).dtype
            self.hidden = torch.zeros(max_seqs, hidden_width, dtype=dtype, device=device)
        self.depth = self.row_extra  # each row's steps (staged with its base)
        self.positions = torch.zeros(max_seqs, **int64)
        self.slots = torch.full((max_seqs,), self.scratch_slot, **int64)
        self.seq_lens = torch.ones(max_seqs, dtype=torch.int32, device=device)
        self.query_start = torch.arange(max_seqs + 1, dtype=torch.int32, device=device)
        self.out = torch.zeros(max_seqs, num_steps, **int64)
        for bucket in self.buckets:  # every step: one token per row
            meta = self._meta(
                bucket,
                bucket,
                1,
                query_start=self.query_start[: bucket + 1],
                seq_lens=self.seq_lens[:bucket],
                positions=self.positions[:bucket],
                slots=self.slots[:bucket],
            )
            self._step_metas[bucket] = [meta]
        self._capture_all()

    @torch.inference_mode()
    def run(
        self,
        first_tokens: torch.Tensor,
        first_hidden: torch.Tensor | None,
        base: list[int],
        depth: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """Drafts ``[B, num_steps]`` (device; row ``b`` is valid up to ``depth[b]``) after
        each row's first draft ``first_tokens[b]`` (device), whose step sits at cache index
        ``base[b]`` of a sequence with block table ``block_tables[b]``. The result is a view
        of a static buffer: read it before the next run."""
        n = len(base)
        bucket = self._bucket(n)
        last = max(b + max(d, 1) - 1 for b, d in zip(base, depth, strict=True))
        self._stage(bucket, base, depth, block_tables, last)
        self.tokens[:n].copy_(first_tokens)
        if self.hidden is not None:
            assert first_hidden is not None
            self.hidden[:n].copy_(first_hidden)
        self._launch(bucket)
        return self.out[:n]

    def draft_tensor(
        self,
        first_tokens: torch.Tensor,
        first_hidden: torch.Tensor | None,
        base: list[int],
        depth: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """Each row's whole chain on the device, ``[B, max(depth)]`` (row ``b`` valid up to
        ``depth[b]``): its first draft, then ``depth[b] - 1`` more from :meth:`run`
        (``base[b]``: the cache index of its second draft's step). A tensor of its own,
        which later runs do not overwrite."""
        pieces: list[torch.Tensor] = []
        width = max(depth)
        for lo in range(0, len(base), self.max_seqs):  # more rows than the largest bucket
            hi = lo + self.max_seqs
            tokens = first_tokens[lo:hi, None]
            steps = [d - 1 for d in depth[lo:hi]]
            if max(steps) > 0:
                hidden = first_hidden[lo:hi] if first_hidden is not None else None
                rest = self.run(tokens[:, 0], hidden, base[lo:hi], steps, block_tables[lo:hi])
                tokens = torch.cat((tokens, rest[:, : width - 1]), dim=1)
            else:  # no row of this part goes past its first draft
                tokens = torch.cat((tokens, tokens.new_zeros(len(tokens), width - 1)), dim=1)
            pieces.append(tokens)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def drafts(
        self,
        first_tokens: torch.Tensor,
        first_hidden: torch.Tensor | None,
        base: list[int],
        depth: list[int],
        block_tables: list[list[int]],
    ) -> list[list[int]]:
        """:meth:`draft_tensor`'s chains on the host, read back once for the batch."""
        rows = self.draft_tensor(first_tokens, first_hidden, base, depth, block_tables).tolist()
        return [row[:d] for row, d in zip(rows, depth, strict=True)]

    def _body(self, bucket: int, prepare: bool) -> None:
        (meta,), calls = self._step_metas[bucket], self.calls
        base, depth, tables = self.base[:bucket], self.depth[:bucket], self.tables[:bucket]
        tokens = self.tokens[:bucket]
        hidden = self.hidden[:bucket] if self.hidden is not None else None
        for j in range(self.num_steps):
            position = base + j
            live = depth > j
            slots = self._slots(position[:, None], tables)[:, 0]
            self.slots[:bucket].copy_(torch.where(live, slots, self.scratch_slot))
            self.positions[:bucket].copy_(position)
            # A row past its depth sees one key (its table's first, a valid block).
            self.seq_lens[:bucket].copy_(torch.where(live, position + 1, 1))
            if prepare:
                self.runner.backend.prepare(meta, self.runner.block_size)
            rows = calls.forward(tokens, self.positions[:bucket], hidden, meta)
            tokens = greedy_ids(calls.logits(rows).float(), calls.to_target)
            hidden = rows if hidden is not None else None
            self.out[:bucket, j].copy_(tokens)


class TreeGraphs(_DraftGraphs):
    """Token trees of ``size`` nodes at most, ``topk`` children a round, at most
    ``depth`` deep (the root's children are depth 1), for up to ``max_seqs`` sequences;
    ``hidden_width``: an EAGLE head, whose nodes read their parent's output row."""

    def __init__(
        self,
        runner: ModelRunner,
        calls: DraftModelCalls,
        topk: int,
        size: int,
        depth: int,
        max_seqs: int,
        hidden_width: int = 0,
        capture: bool = True,
        pool=None,
        catch_up: int = 0,
    ) -> None:
        # With ``catch_up`` rows (an EAGLE head with ``calls.features``): a second graph per
        # bucket first feeds each row's newest tokens (at most ``catch_up``) to the head, as
        # the proposer's catch-up step does, and grows the tree from the last one's output,
        # so that a round's drafting is one staging and one launch.
        catch_up = catch_up if hidden_width and calls.features is not None else 0
        super().__init__(runner, calls, max_seqs, capture, pool, row_columns=catch_up)
        self.catch_up = catch_up
        self.topk, self.size = topk, size
        self.catch_up_replays = 0  # runs that fed the head its catch-up first
        # Each round: (nodes run, of which the newest are the frontier, nodes it adds).
        self.rounds: list[tuple[int, int, int]] = []
        nodes = frontier = min(topk, size)
        self.first = nodes
        for _ in range(1, depth):
            if nodes >= size:
                break
            added = min(topk, size - nodes)
            self.rounds.append((nodes, frontier, added))
            nodes, frontier = nodes + added, added
        self.num_nodes = nodes
        device = runner.device
        int64 = dict(dtype=torch.int64, device=device)
        s = max_seqs
        self.tokens = torch.zeros(s, size, **int64)  # node m at column m - 1
        self.parents = torch.zeros(s, size, **int64)  # 0: the root
        self.scores = torch.zeros(s, size, dtype=torch.float64, device=device)
        self.depths = torch.zeros(s, size + 1, **int64)  # node m at column m (root: 0)
        self.ancestors = torch.zeros(s, size, size, dtype=torch.bool, device=device)
        self.eye = torch.eye(size, dtype=torch.bool, device=device)
        self.nodes = torch.arange(size, **int64)
        self.outputs = None  # node m's output row at [:, m] (root: 0)
        if hidden_width:
            dtype = next(runner.model.parameters()).dtype
            self.outputs = torch.zeros(s, size + 1, hidden_width, dtype=dtype, device=device)
            self.hidden_in = torch.zeros(s * size, hidden_width, dtype=dtype, device=device)
        # Each round's step: the mixed layout under the tree mask.
        tokens = s * size
        self.input_ids = torch.zeros(tokens, **int64)
        self.positions = torch.zeros(tokens, **int64)
        self.slots = torch.full((tokens,), self.scratch_slot, **int64)
        self.seq_lens = torch.zeros(s, dtype=torch.int32, device=device)
        self.query_start = torch.zeros(s + 1, dtype=torch.int32, device=device)
        self.steps = torch.arange(s + 1, dtype=torch.int32, device=device)
        self.mask = torch.zeros(s * size * size, dtype=torch.bool, device=device)
        self.mask_offsets = torch.zeros(s + 1, dtype=torch.int32, device=device)
        if self.catch_up:
            rows = self.catch_up
            # Staged with the rows' bases: each row's tokens (padding rows: 1) and the
            # tokens, left-aligned and padded.
            self.cu_counts, self.cu_tokens = self.row_extra, self.row_staging
            self.cu_counts.fill_(1)  # what the captures run on
            self.cu_positions = torch.zeros(s * rows, **int64)
            self.cu_slots = torch.full((s * rows,), self.scratch_slot, **int64)
            self.cu_seq_lens = torch.zeros(s, dtype=torch.int32, device=device)
            # Every sequence a block of ``rows``: fixed offsets, written once.
            steps = torch.arange(s + 1, dtype=torch.int32, device=device)
            self.cu_query_start = steps * rows
            self.cu_mask = torch.zeros(s * rows * rows, dtype=torch.bool, device=device)
            self.cu_mask_offsets = steps * (rows * rows)
            self.cu_rows = torch.arange(rows, **int64)
            # Row i sees row j <= i of its block while j is a token (a padding row: itself).
            self.cu_causal = torch.ones(rows, rows, dtype=torch.bool, device=device).tril()
            self.cu_eye = torch.eye(rows, dtype=torch.bool, device=device)
            self._cu_metas = {
                bucket: self._meta(
                    bucket,
                    bucket * rows,
                    rows,
                    query_start=self.cu_query_start[: bucket + 1],
                    seq_lens=self.cu_seq_lens[:bucket],
                    positions=self.cu_positions[: bucket * rows],
                    slots=self.cu_slots[: bucket * rows],
                    mask=self.cu_mask[: bucket * rows * rows],
                    mask_offsets=self.cu_mask_offsets[: bucket + 1],
                )
                for bucket in self.buckets
            }
        if self.catch_up:
            self._variants = (False, True)
        for bucket in self.buckets:  # a round's step: every row's nodes so far
            self._step_metas[bucket] = [
                self._meta(
                    bucket,
                    bucket * nodes,
                    nodes,
                    query_start=self.query_start[: bucket + 1],
                    seq_lens=self.seq_lens[:bucket],
                    positions=self.positions[: bucket * nodes],
                    slots=self.slots[: bucket * nodes],
                    mask=self.mask[: bucket * nodes * nodes],
                    mask_offsets=self.mask_offsets[: bucket + 1],
                )
                for nodes, _, _ in self.rounds
            ]
        self._capture_all()

    @torch.inference_mode()
    def grow(
        self,
        root_logits: torch.Tensor | None,
        root_hidden: torch.Tensor | None,
        base: list[int],
        block_tables: list[list[int]],
        catch_up: tuple[list[list[int]], list[int]] | None = None,
    ) -> list[tuple[list[int], list[int]]]:
        """Each row's tree as (tokens, parents), read back once: the root's ``topk`` best
        children from ``root_logits[b]`` (the proposer's vocabulary, device), then the
        rounds; node 1 sits at cache index ``base[b]``. With ``catch_up`` (tokens, counts)
        instead of the root's logits and output: row ``b`` first feeds the head its
        ``counts[b]`` newest tokens ``tokens[b]`` (at cache indices ``base[b] - counts[b]``
        on, each with the target's feature there), and its root is the last one's output."""
        trees: list[tuple[list[int], list[int]]] = []
        for n in self._runs(root_logits, root_hidden, base, block_tables, catch_up):
            out = torch.stack((self.tokens[:n], self.parents[:n]), dim=1)[:, :, : self.num_nodes]
            for tokens, parents in out.tolist():
                trees.append((tokens, parents))
        return trees

    @torch.inference_mode()
    def grow_on_device(
        self,
        root_logits: torch.Tensor | None,
        root_hidden: torch.Tensor | None,
        base: list[int],
        block_tables: list[list[int]],
        catch_up: tuple[list[list[int]], list[int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`grow` without the read-back: every row's tree of ``num_nodes`` nodes as
        device tensors, copied out of the static buffers (the next replay reuses them):
        tokens and parents ``[n, W]`` (node ``m`` at column ``m - 1``), depths ``[n, W]``
        (the root's children: 1) and ancestor masks ``[n, W, W]`` (each node's path among
        the nodes, itself included)."""
        parts = []
        width = self.num_nodes
        for n in self._runs(root_logits, root_hidden, base, block_tables, catch_up):
            parts.append(
                (
                    self.tokens[:n, :width].clone(),
                    self.parents[:n, :width].clone(),
                    self.depths[:n, 1 : width + 1].clone(),
                    self.ancestors[:n, :width, :width].clone(),
                )
            )
        if len(parts) == 1:
            return parts[0]
        tokens, parents, depths, ancestors = (torch.cat(piece) for piece in zip(*parts))
        return tokens, parents, depths, ancestors

    def _runs(self, root_logits, root_hidden, base, block_tables, catch_up) -> Iterator[int]:
        """Grow the rows' trees a bucket's worth at a time (more rows than the largest
        bucket take several runs); after each run, how many rows its buffers hold."""
        for lo in range(0, len(base), self.max_seqs):
            hi = lo + self.max_seqs
            if catch_up is not None:
                part = (catch_up[0][lo:hi], catch_up[1][lo:hi])
                yield self._run(None, None, base[lo:hi], block_tables[lo:hi], part)
                continue
            hidden = root_hidden[lo:hi] if root_hidden is not None else None
            yield self._run(root_logits[lo:hi], hidden, base[lo:hi], block_tables[lo:hi])

    def _run(self, root_logits, root_hidden, base, block_tables, catch_up=None) -> int:
        """Grow the trees of ``len(base)`` rows (at most ``max_seqs``) into the buffers."""
        n, first = len(base), self.first
        bucket = self._bucket(n)
        if catch_up is not None:
            assert self.catch_up, "trees without a catch-up graph take the root's logits"
            tokens, counts = catch_up
            # The catch-up's block reaches catch_up - 1 indices past its first.
            last = max(base) + max(self.num_nodes, self.catch_up) - 1
            self._stage(bucket, base, counts, block_tables, last)
            self._host_rows[1, n:bucket] = 1  # padding rows: one token each
            staged = self._host_row_staging
            staged[:bucket] = 0
            for row, ids in enumerate(tokens):
                staged[row, : len(ids)] = ids
            self._variant = True
            self.catch_up_replays += 1
            self._launch(bucket)
            self._variant = False
            return n
        self._stage(bucket, base, [0] * n, block_tables, max(base) + self.num_nodes - 1)
        top = root_logits.log_softmax(dim=-1).topk(first)
        self.tokens[:n, :first].copy_(self.calls.target_ids(top.indices))
        self.scores[:n, :first].copy_(top.values.double())
        if self.outputs is not None:
            assert root_hidden is not None
            self.outputs[:n, 0].copy_(root_hidden)
        self._launch(bucket)
        return n

    def _capture_metas(self, bucket: int) -> list[AttentionMetadata]:
        metas = self._step_metas[bucket]
        return [self._cu_metas[bucket], *metas] if self._variant else metas

    def _catch_up_root(self, bucket: int, prepare: bool) -> None:
        """The head's catch-up over each row's newest tokens (one masked block of
        ``catch_up`` rows a sequence; rows past its count write only the scratch slot and
        see nothing but themselves), then the root's children from the last token's
        output: what the proposer's catch-up step and :meth:`_run` do from the host."""
        calls, b, rows = self.calls, bucket, self.catch_up
        count, base, tables = self.cu_counts[:b], self.base[:b], self.tables[:b]
        first_index = base - count  # the first token's cache index
        index = first_index[:, None] + self.cu_rows  # [b, rows]
        live = self.cu_rows < count[:, None]
        index = index.clamp(min=0)  # padding rows of the bucket (base 0)
        slots = torch.where(live, self._slots(index, tables), self.scratch_slot)
        self.cu_slots[: b * rows].copy_(slots.reshape(-1))
        self.cu_positions[: b * rows].copy_(index.reshape(-1))
        self.cu_seq_lens[:b].copy_((first_index + rows).clamp(min=rows))
        mask = self.cu_causal & (live[:, None, :] | self.cu_eye)
        self.cu_mask[: b * rows * rows].copy_(mask.reshape(-1))
        meta = self._cu_metas[b]
        if prepare:
            self.runner.backend.prepare(meta, self.runner.block_size)
        assert calls.features is not None and self.outputs is not None
        hidden = calls.features(self.cu_slots[: b * rows]).to(self.outputs.dtype)
        out = calls.forward(
            self.cu_tokens[:b].reshape(-1), self.cu_positions[: b * rows], hidden, meta
        )
        width = out.shape[-1]
        last = (count - 1)[:, None, None].expand(b, 1, width)
        root = out.view(b, rows, width).gather(1, last)[:, 0]
        top = calls.logits(root).float().log_softmax(dim=-1).topk(self.first)
        self.tokens[:b, : self.first] = calls.target_ids(top.indices)
        self.scores[:b, : self.first] = top.values.double()
        self.outputs[:b, 0] = root

    def _body(self, bucket: int, prepare: bool) -> None:
        calls, first, b = self.calls, self.first, bucket
        if self._variant:
            self._catch_up_root(bucket, prepare)
        base, tables = self.base[:b], self.tables[:b]
        tokens, parents = self.tokens[:b], self.parents[:b]
        depths, ancestors = self.depths[:b], self.ancestors[:b]
        # The root's children: depth 1, each its own only ancestor among the nodes.
        parents.zero_()
        depths.zero_()
        depths[:, 1 : first + 1] = 1
        ancestors.zero_()
        ancestors[:, :first] = self.eye[:first]
        for (nodes, frontier, added), meta in zip(self.rounds, self._step_metas[b], strict=True):
            count = b * nodes
            index = base[:, None] + self.nodes[:nodes]  # node m at base + m - 1
            self.slots[:count].copy_(self._slots(index, tables).reshape(-1))
            self.positions[:count].copy_((base[:, None] - 1 + depths[:, 1 : nodes + 1]).reshape(-1))
            self.input_ids[:count].copy_(tokens[:, :nodes].reshape(-1))
            self.seq_lens[:b].copy_(base + nodes)
            self.query_start[: b + 1].copy_(self.steps[: b + 1] * nodes)
            self.mask[: count * nodes].copy_(ancestors[:, :nodes, :nodes].reshape(-1))
            self.mask_offsets[: b + 1].copy_(self.steps[: b + 1] * (nodes * nodes))
            hidden = None
            if self.outputs is not None:
                width = self.outputs.shape[2]
                rows = parents[:, :nodes, None].expand(b, nodes, width)
                hidden = self.hidden_in[:count]
                hidden.copy_(self.outputs[:b].gather(1, rows).reshape(count, width))
            if prepare:
                self.runner.backend.prepare(meta, self.runner.block_size)
            out = calls.forward(self.input_ids[:count], self.positions[:count], hidden, meta)
            newest = out.view(b, nodes, -1)[:, nodes - frontier :]  # the frontier's rows
            if self.outputs is not None:
                self.outputs[:b, nodes - frontier + 1 : nodes + 1] = newest
            self._extend(newest, nodes, frontier, added)

    def _extend(self, newest: torch.Tensor, nodes: int, frontier: int, added: int) -> None:
        """Add the ``added`` best children of the frontier (nodes ``nodes - frontier + 1 ..
        nodes``, output rows ``newest``) by path score, as :meth:`_Tree.extend` does."""
        b, topk, calls = newest.shape[0], self.topk, self.calls
        logprobs = calls.logits(newest.reshape(b * frontier, -1)).float().log_softmax(dim=-1)
        best = logprobs.topk(topk)
        children = calls.target_ids(best.indices).view(b, frontier * topk)
        path = self.scores[:b, nodes - frontier : nodes, None] + best.values.double().view(
            b, frontier, topk
        )
        path = path.view(b, frontier * topk)
        node_ids = self.nodes[nodes - frontier : nodes, None] + 1  # each frontier node
        node_ids = node_ids.expand(frontier, topk).reshape(1, -1).expand(b, -1)  # topk times
        # Descending by (score, node, token): stable sorts, least significant key first.
        order = children.argsort(dim=1, descending=True, stable=True)
        for key in (node_ids, path):
            step = key.gather(1, order).argsort(dim=1, descending=True, stable=True)
            order = order.gather(1, step)
        chosen = order[:, :added]
        new = slice(nodes, nodes + added)
        parent = node_ids.gather(1, chosen)
        self.tokens[:b, new] = children.gather(1, chosen)
        self.scores[:b, new] = path.gather(1, chosen)
        self.parents[:b, new] = parent
        self.depths[:b, nodes + 1 : nodes + added + 1] = self.depths[:b].gather(1, parent) + 1
        size = self.size
        above = self.ancestors[:b].gather(1, (parent - 1)[:, :, None].expand(b, added, size))
        self.ancestors[:b, new] = above | self.eye[new]
