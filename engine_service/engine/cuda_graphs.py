"""CUDA graphs of the whole forward pass, for decode steps and for mixed steps alike.

Graphs are captured at start for token-count buckets up to ``max_tokens``. Up to three kinds
per bucket ``T``:

- *decode*: ``T`` sequences of one query token each;
- *mixed*: up to ``min(T, max_seqs)`` sequences sharing ``T`` query tokens in any split:
  decodes beside small prefill chunks and extends over cached prefixes;
- *tree* (``trees=True``, buckets up to 512 tokens): the mixed layout under a custom mask,
  for steps that carry token trees (speculative verification, tree drafting). The flat mask
  and its per-sequence offsets are copied into static buffers sized for the largest such
  bucket (a step of ``T`` tokens has at most ``T * T`` mask entries).

With LoRA (deltas that read no device data on the host), every shape is captured twice: with
the deltas, reading each token's adapter slot from a static buffer, for steps that hold an
adapter; and without, for base-only steps, which then launch nothing for LoRA.

The kinds differ in the attention launch the backend picks (tile shapes for one query row
against tiles for longer runs, the mask variant), which is fixed at capture.

The same class captures a proposer's forward passes (a draft model's, an EAGLE head's; see
:mod:`engine_service.engine.spec.graphs`): ``hidden_width`` gives the graphs a static input
of one hidden row per token, for models whose forward takes one (EAGLE heads), and ``pool``
lets them share the target's graph memory pool. Graphs sharing a pool may reuse each other's
scratch memory, so a replay's output is valid until the next replay of any of them: callers
read it (or copy what they keep) first.

A live step is copied into the static input buffers of the smallest bucket that holds it
and padded: padding tokens write their K/V into the scratch block the pool never hands out,
padding sequences have no query rows (mixed) or one row over the scratch block (decode).
The rows past the live ones compute garbage that nothing reads. Only backends that declare
``supports_cuda_graphs`` are captured; the capture goes through the backend's
``prepare_for_capture`` / ``prepare_for_replay`` hooks, never its class name.

With ``capture=False`` nothing is captured and a "replay" runs the model eagerly on the same
static, padded buffers: the CPU twin that tests the bucketing and padding without a GPU.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

from engine_service.layers.paged_attention import AttentionMetadata

if TYPE_CHECKING:
    from engine_service.engine.model_runner import ModelRunner, StepInputs

_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# Tree graphs' static mask holds (largest tree bucket)^2 entries: 256 KiB at 512 tokens.
_TREE_MAX_TOKENS = 512


class StepGraphs:
    def __init__(
        self,
        runner: ModelRunner,
        max_tokens: int,
        max_seqs: int,
        capture: bool = True,
        mixed: bool | None = None,
        trees: bool = False,
        hidden_width: int = 0,
        pool=None,
    ) -> None:
        self.runner = runner
        self.max_tokens = max_tokens
        self.max_seqs = max_seqs
        self.capture = capture
        self.buckets = sorted({b for b in _BUCKETS if b < max_tokens} | {max_tokens})
        self.mixed_ok = runner.backend.supports_mixed_graphs if mixed is None else mixed
        # Trees ride the mixed layout; one-token "trees" are chains and never carry a mask.
        self.tree_buckets = (
            [b for b in self.buckets if 1 < b <= _TREE_MAX_TOKENS]
            if trees and self.mixed_ok
            else []
        )
        self.pool = pool  # the memory pool the graphs share (given, or the first capture's)
        self.replays: dict[str, int] = {}  # per kind, for benchmarks and checks
        # A decode step has at most max_seqs sequences: no larger decode bucket is needed.
        self.max_decode_bucket = self._bucket(min(max_seqs, max_tokens))
        device = runner.device
        size = runner.block_size
        int32 = dict(dtype=torch.int32, device=device)
        int64 = dict(dtype=torch.int64, device=device)
        seqs = max_tokens
        self.scratch_slot = runner.scratch_block * size
        self.input_ids = torch.zeros(max_tokens, **int64)
        self.positions = torch.zeros(max_tokens, **int64)
        self.slots = torch.full((max_tokens,), self.scratch_slot, **int64)
        self.query_start = torch.zeros(seqs + 1, **int32)
        self.seq_lens = torch.zeros(seqs, **int32)
        self.tables = torch.full((seqs, runner.max_blocks_per_seq), runner.scratch_block, **int32)
        # Adapter slot per token when the model's LoRA deltas can be captured: every graph
        # then carries the deltas, reading the slots here (-1, no adapter, for base tokens
        # and padding). Otherwise steps holding an adapter run eagerly.
        lora = runner.lora_slots
        self.lora_slots = (
            torch.full((max_tokens,), -1, **int64) if lora is not None and lora.graph_safe else None
        )
        self.mask = self.mask_offsets = None
        if self.tree_buckets:
            self.mask = torch.zeros(self.tree_buckets[-1] ** 2, dtype=torch.bool, device=device)
            # int32, as the kernels' warm-up compiles them (a step's offsets fit: <= 512^2).
            self.mask_offsets = torch.zeros(seqs + 1, **int32)
        # A hidden row per token (EAGLE heads read the target's feature, or their own output).
        self.hidden_in = None
        if hidden_width:
            dtype = next(runner.model.parameters()).dtype
            self.hidden_in = torch.zeros(max_tokens, hidden_width, dtype=dtype, device=device)
        self._graphs: dict[
            tuple[str, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, AttentionMetadata]
        ] = {}
        # With LoRA: the same shapes captured without the deltas, for base-only steps.
        self._base_graphs: dict[
            tuple[str, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, AttentionMetadata]
        ] = {}
        self._capture_all()

    # -- choosing -------------------------------------------------------------------------

    def _kind(self, inputs: StepInputs) -> str | None:
        meta = inputs.meta
        if meta.num_tokens > self.max_tokens:
            return None
        if inputs.lora_token_slots is not None and self.lora_slots is None:
            return None
        bucket = self._bucket(meta.num_tokens)
        if meta.custom_mask is not None:
            if meta.num_seqs > min(bucket, self.max_seqs):
                return None
            kind = "tree"
        elif meta.max_query_len == 1:
            kind = "decode"
        elif self.mixed_ok and meta.num_seqs <= min(bucket, self.max_seqs):
            kind = "mixed"
        else:
            return None
        return kind if (kind, bucket) in self._graphs else None

    def _bucket(self, num_tokens: int) -> int:
        return next(b for b in self.buckets if b >= num_tokens)

    def fits(self, inputs: StepInputs) -> bool:
        return self._kind(inputs) is not None

    # -- replay ---------------------------------------------------------------------------

    def replay(
        self, input_ids: torch.Tensor, inputs: StepInputs, hidden_in: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states ``[num_tokens, hidden]`` of the live step, from its graph (a view of
        the graph's output: the next replay overwrites it). ``hidden_in``: the step's hidden
        input rows, for graphs built with ``hidden_width``."""
        kind = self._kind(inputs)
        assert kind is not None
        assert (hidden_in is None) == (self.hidden_in is None), "hidden rows iff hidden_width"
        self.replays[kind] = self.replays.get(kind, 0) + 1
        meta = inputs.meta
        n, b = meta.num_tokens, meta.num_seqs
        bucket = self._bucket(n)
        base_only = self.lora_slots is not None and inputs.lora_token_slots is None
        graphs = self._base_graphs if base_only and self.capture else self._graphs
        graph, hidden, captured = graphs[(kind, bucket)]
        self.input_ids[:n].copy_(input_ids)
        if hidden_in is not None:
            self.hidden_in[:n].copy_(hidden_in)
        if kind == "tree":
            self.mask[: meta.custom_mask.numel()].copy_(meta.custom_mask)
            self.mask_offsets[: b + 1].copy_(meta.custom_mask_offsets)
        self.positions[:n].copy_(inputs.positions)
        self.slots[:n].copy_(meta.slot_mapping)
        self.slots[n:bucket].fill_(self.scratch_slot)
        width = meta.block_tables.shape[1]
        self.tables[:b, :width].copy_(meta.block_tables)
        self.query_start[: b + 1].copy_(meta.query_start_loc)
        self.seq_lens[:b].copy_(meta.seq_lens)
        num_seqs = captured.num_seqs
        if kind == "decode":
            # Padding sequences: one row each over the scratch block.
            self.query_start[b + 1 : num_seqs + 1].copy_(
                torch.arange(b + 1, num_seqs + 1, device=self.query_start.device)
            )
            self.seq_lens[b:num_seqs].fill_(1)
            self.tables[b:num_seqs, 0].fill_(self.runner.scratch_block)
        else:
            self.query_start[b + 1 : num_seqs + 1].fill_(n)
            self.seq_lens[b:num_seqs].fill_(0)
        if self.lora_slots is not None and not base_only:
            self.lora_slots[:n].copy_(inputs.lora_token_slots)
            self.lora_slots[n:bucket].fill_(-1)
        if not self.capture:
            if self.lora_slots is not None:
                self.runner.lora_slots.set(None if base_only else self.lora_slots[:bucket])
            return self._eager(captured)[:n]
        self.runner.backend.prepare_for_replay(captured, meta, self.runner.block_size)
        graph.replay()
        return hidden[:n]

    def _eager(self, meta: AttentionMetadata) -> torch.Tensor:
        self.runner.backend.prepare(meta, self.runner.block_size)
        return self._forward(meta)

    def _forward(self, meta: AttentionMetadata) -> torch.Tensor:
        """The model over the static buffers of ``meta``'s bucket (captured, or the twin)."""
        runner, n = self.runner, meta.num_tokens
        if self.hidden_in is None:
            return runner.model(self.input_ids[:n], meta.positions, runner.kv_cache, meta)
        return runner.model(
            self.input_ids[:n], meta.positions, self.hidden_in[:n], runner.kv_cache, meta
        )

    # -- capture --------------------------------------------------------------------------

    def _meta(self, kind: str, bucket: int) -> AttentionMetadata:
        num_seqs = bucket if kind == "decode" else min(bucket, self.max_seqs)
        tree = kind == "tree"
        return AttentionMetadata(
            num_tokens=bucket,
            num_seqs=num_seqs,
            max_query_len=1 if kind == "decode" else bucket,
            max_seq_len=self.runner.max_blocks_per_seq * self.runner.block_size,
            query_start_loc=self.query_start[: num_seqs + 1],
            seq_lens=self.seq_lens[:num_seqs],
            positions=self.positions[:bucket],
            slot_mapping=self.slots[:bucket],
            block_tables=self.tables[:num_seqs],
            # Graphs read no host twins; the eager CPU twin's buffers are host tensors.
            query_start_loc_host=self.query_start[: num_seqs + 1]
            if not self.capture
            else torch.zeros(num_seqs + 1, dtype=torch.int32),
            seq_lens_host=self.seq_lens[:num_seqs]
            if not self.capture
            else torch.zeros(num_seqs, dtype=torch.int32),
            custom_mask=self.mask if tree else None,
            custom_mask_offsets=self.mask_offsets[: num_seqs + 1] if tree else None,
        )

    def _kinds(self) -> list[tuple[str, int]]:
        """Every (kind, bucket) a step can have."""
        shapes = []
        for bucket in reversed(self.buckets):
            if bucket <= self.max_decode_bucket:
                shapes.append(("decode", bucket))
            if self.mixed_ok and bucket > 1:
                shapes.append(("mixed", bucket))
            if bucket in self.tree_buckets:
                shapes.append(("tree", bucket))
        return shapes

    @torch.inference_mode()
    def _capture_all(self) -> None:
        runner = self.runner
        if not self.capture:
            for kind, bucket in self._kinds():
                self._graphs[(kind, bucket)] = (None, None, self._meta(kind, bucket))
            return
        pool = self.pool
        # With LoRA, each shape is captured twice: with the deltas (steps holding an
        # adapter) and without (base-only steps, which then launch nothing for LoRA).
        variants = (True, False) if self.lora_slots is not None else (False,)
        for (kind, bucket), with_lora in itertools.product(self._kinds(), variants):
            meta = self._meta(kind, bucket)
            # A valid layout to warm up and capture with: one token per sequence (decode)
            # or every token in the first sequence (mixed, tree: under the causal mask), all
            # over the scratch block.
            if kind == "decode":
                self.query_start[: meta.num_seqs + 1].copy_(
                    torch.arange(meta.num_seqs + 1, device=self.query_start.device)
                )
                self.seq_lens[: meta.num_seqs].fill_(1)
            else:
                self.query_start[0] = 0
                self.query_start[1 : meta.num_seqs + 1].fill_(bucket)
                self.seq_lens[0] = bucket
                self.seq_lens[1 : meta.num_seqs].fill_(0)
            if kind == "tree":
                causal = torch.ones(bucket, bucket, dtype=torch.bool, device=self.mask.device)
                self.mask[: bucket * bucket].copy_(causal.tril().flatten())
                self.mask_offsets.zero_()
            self.positions[:bucket].copy_(
                torch.arange(bucket, device=self.positions.device) % runner.block_size
                if kind == "decode"
                else torch.arange(bucket, device=self.positions.device)
            )
            runner.backend.prepare_for_capture(meta, runner.block_size)
            if self.lora_slots is not None:
                runner.lora_slots.set(self.lora_slots[:bucket] if with_lora else None)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(meta)
            torch.cuda.current_stream().wait_stream(stream)
            if with_lora:
                # Clear what the warm-up cached per step (token groups, masks), so that
                # the graph computes them from the slots buffer on every replay.
                runner.lora_slots.set(self.lora_slots[:bucket])
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._forward(meta)
            pool = graph.pool()
            base_only = self.lora_slots is not None and not with_lora
            graphs = self._base_graphs if base_only else self._graphs
            graphs[(kind, bucket)] = (graph, hidden, meta)
        self.pool = pool
        if self.lora_slots is not None:
            runner.lora_slots.set(None)
        torch.cuda.synchronize()
