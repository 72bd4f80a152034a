"""The model runner: turns a scheduled batch into flat tensors and runs the model once."""

from __future__ import annotations

import torch

from engine_service.engine.attention import AttentionMetadata, PrefillSlice
from engine_service.engine.scheduler import ScheduledBatch
from engine_service.models.layers import CausalLM


class ModelRunner:
    """Owns the model and the KV cache tensor; one ``execute`` per engine step.

    Inputs are built on the host as plain lists and moved to the device in one copy each.
    """

    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, block_size: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run the batch; return fp32 logits for each sequence with ``sample`` set, in order."""
        for src, dst in batch.block_copies:
            self.kv_cache[dst].copy_(self.kv_cache[src])

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
            return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

        width = max((len(t) for t in decode_tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in decode_tables]
        meta = AttentionMetadata(
            slot_block=tensor(slot_block),
            slot_offset=tensor(slot_offset),
            decode_rows=tensor(decode_rows),
            decode_block_tables=torch.tensor(padded, dtype=torch.long)
            .reshape(len(padded), width)
            .to(device),
            decode_seq_lens=tensor(decode_lens),
            num_decodes=len(decode_rows),
            prefills=[
                PrefillSlice(q0, q1, start, seq_len, tensor(blocks))
                for q0, q1, start, seq_len, blocks in prefill_specs
            ],
        )
        return tensor(token_ids), tensor(positions), meta, tensor(logits_rows)
