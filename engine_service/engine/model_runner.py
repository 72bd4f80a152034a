"""The model runner: turns a scheduled batch into flat tensors and runs the model once."""

from __future__ import annotations

import torch

from engine_service.engine.attention import AttentionMetadata, PrefillSlice
from engine_service.engine.scheduler import ScheduledBatch
from engine_service.models.layers import CausalLM


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy step inputs without stalling the host: from pinned memory, asynchronously.

    A copy from pageable memory would wait for every kernel already queued.
    """
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


class ModelRunner:
    """Owns the model and the KV cache tensor; one ``execute`` per engine step.

    Inputs are built on the host as plain lists and moved to the device in one copy each.
    With ``cuda_graph_max_batch > 0`` (CUDA and a gather-free decode backend), a step made
    only of decodes replays a CUDA graph captured for the next batch size up: its inputs
    are copied into static buffers, and padding rows point at ``scratch_block``.
    """

    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        block_size: int,
        scratch_block: int | None = None,
        max_blocks_per_seq: int = 0,
        cuda_graph_max_batch: int = 0,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        self.graphs: DecodeGraphs | None = None
        if cuda_graph_max_batch > 0:
            assert scratch_block is not None
            self.graphs = DecodeGraphs(
                model, kv_cache, scratch_block, max_blocks_per_seq, cuda_graph_max_batch
            )

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run the batch; return fp32 logits for each sequence with ``sample`` set, in order."""
        for src, dst in batch.block_copies:
            self.kv_cache[dst].copy_(self.kv_cache[src])

        if self.graphs is not None and self.graphs.fits(batch):
            hidden = self.graphs.run(batch, self.block_size)
            return self.model.compute_logits(hidden).float()
        input_ids, positions, meta, logits_rows = self._prepare(batch)
        hidden = self.model(input_ids, positions, self.kv_cache, meta)
        return self.model.compute_logits(hidden[logits_rows]).float()

    def _prepare(self, batch: ScheduledBatch):
        size = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slot_block: list[int] = []
        slot_offset: list[int] = []
        logits_rows: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefill_specs: list[tuple[int, int, int, int, list[int]]] = []

        for seq in batch.sequences:
            request = seq.request
            start, end = seq.start, seq.start + seq.num_tokens
            table = request.block_table
            row = len(token_ids)
            token_ids.extend(request.all_token_ids[start:end])
            positions.extend(range(start, end))
            for pos in range(start, end):
                slot_block.append(table[pos // size])
                slot_offset.append(pos % size)
            if seq.sample:
                logits_rows.append(row + seq.num_tokens - 1)
            num_blocks = -(-end // size)
            if seq.num_tokens == 1:
                decode_rows.append(row)
                decode_tables.append(table[:num_blocks])
                decode_lens.append(end)
            else:
                prefill_specs.append((row, row + seq.num_tokens, start, end, table[:num_blocks]))

        device = self.device

        def tensor(values: list[int]) -> torch.Tensor:
            return to_device(torch.tensor(values, dtype=torch.long), device)

        width = max((len(t) for t in decode_tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in decode_tables]
        meta = AttentionMetadata(
            slot_block=tensor(slot_block),
            slot_offset=tensor(slot_offset),
            decode_rows=tensor(decode_rows),
            decode_block_tables=to_device(
                torch.tensor(padded, dtype=torch.long).reshape(len(padded), width), device
            ),
            decode_seq_lens=tensor(decode_lens),
            num_decodes=len(decode_rows),
            prefills=[
                PrefillSlice(q0, q1, start, seq_len, tensor(blocks))
                for q0, q1, start, seq_len, blocks in prefill_specs
            ],
        )
        return tensor(token_ids), tensor(positions), meta, tensor(logits_rows)


class DecodeGraphs:
    """CUDA graphs of the decode forward pass, one per batch-size bucket.

    Shapes are static per bucket; everything that varies (token ids, positions, slots,
    block tables, context lengths) lives in device buffers that the graph reads. The decode
    kernel loops to each sequence's own length, so one block-table width serves every
    context length.
    """

    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        scratch_block: int,
        max_blocks_per_seq: int,
        max_batch: int,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.scratch_block = scratch_block
        self.max_batch = max_batch
        self.buckets = sorted(
            {b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if b < max_batch}
            | {max_batch}
        )
        device = kv_cache.device
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(max_batch, **long)
        self.positions = torch.zeros(max_batch, **long)
        self.slot_block = torch.full((max_batch,), scratch_block, **long)
        self.slot_offset = torch.zeros(max_batch, **long)
        self.rows = torch.arange(max_batch, **long)
        self.tables = torch.full((max_batch, max_blocks_per_seq), scratch_block, **long)
        self.seq_lens = torch.ones(max_batch, **long)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture_all()

    def fits(self, batch: ScheduledBatch) -> bool:
        return len(batch.sequences) <= self.max_batch and all(
            s.num_tokens == 1 for s in batch.sequences
        )

    def run(self, batch: ScheduledBatch, block_size: int) -> torch.Tensor:
        """Hidden states ``[len(batch.sequences), hidden]`` of a decode-only batch."""
        n = len(batch.sequences)
        bucket = next(b for b in self.buckets if b >= n)
        width = 0
        columns: list[list[int]] = [[], [], [], [], []]
        for seq in batch.sequences:
            request, pos = seq.request, seq.start
            columns[0].append(request.all_token_ids[pos])
            columns[1].append(pos)
            columns[2].append(request.block_table[pos // block_size])
            columns[3].append(pos % block_size)
            columns[4].append(pos + 1)
            width = max(width, pos // block_size + 1)
        # Padding rows attend to one scratch slot and write their K/V there.
        padding = bucket - n
        for column, value in zip(columns, (0, 0, self.scratch_block, 0, 1)):
            column.extend([value] * padding)
        rows = to_device(torch.tensor(columns, dtype=torch.long), self.kv_cache.device)
        self.input_ids[:bucket].copy_(rows[0])
        self.positions[:bucket].copy_(rows[1])
        self.slot_block[:bucket].copy_(rows[2])
        self.slot_offset[:bucket].copy_(rows[3])
        self.seq_lens[:bucket].copy_(rows[4])
        tables = [s.request.block_table[:width] for s in batch.sequences]
        tables += [[]] * padding
        tables = [t + [self.scratch_block] * (width - len(t)) for t in tables]
        self.tables[:bucket, :width].copy_(
            to_device(torch.tensor(tables, dtype=torch.long), self.kv_cache.device)
        )
        graph, hidden = self._graphs[bucket]
        graph.replay()
        return hidden[:n]

    def _meta(self, bucket: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_block=self.slot_block[:bucket],
            slot_offset=self.slot_offset[:bucket],
            decode_rows=self.rows[:bucket],
            decode_block_tables=self.tables[:bucket],
            decode_seq_lens=self.seq_lens[:bucket],
            num_decodes=bucket,
            prefills=[],
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for bucket in reversed(self.buckets):
            meta = self._meta(bucket)
            args = (self.input_ids[:bucket], self.positions[:bucket], self.kv_cache, meta)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.model(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model(*args)
            pool = graph.pool()
            self._graphs[bucket] = (graph, hidden)
        torch.cuda.synchronize()
