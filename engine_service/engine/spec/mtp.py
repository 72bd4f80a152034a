"""The ``mtp`` proposer: the target checkpoint's own multi-token-prediction layer drafts.

DeepSeek-V3's MTP module predicts ``t_{p+2}`` at position ``p`` from the target's final
hidden state ``h_p`` and the embedding of ``t_{p+1}``, through one decoder block with a
latent-attention cache of its own (:class:`~engine_service.models.deepseek_v3.DeepseekV3MTP`).
Per sequence and step::

    target step N   rows p = s .. s+n-1 ──hidden h_p──▶ kept per request (observe_target)
    propose, N+1    catch-up: rows p = base .. known-2, tokens t_{p+1}, hidden h_p
                    (the prompt the first time, then what was accepted since)
                    └─ last row's logits ─▶ d_1, its MTP output h'
                    chain: row known-1+i, token d_i, hidden h' ─▶ d_{i+1}, h'

``known`` is the sequence's token count; its newest token ``t_{known-1}`` has no target hidden
state yet, which is why the chain feeds the MTP layer's own output back (as vLLM does). The
MTP cache is indexed by the target's block tables and slots, like a draft model's: a
rejected draft's entry is overwritten when the catch-up reaches its position with the true
hidden state. Positions whose target hidden state was never computed here (a prefix-cache or
offload hit) keep whatever MTP entries their block holds: drafts may get worse, outputs never
change, since the target verifies every draft. With several MTP layers in the checkpoint
only the first drafts (each further layer would need a catch-up of its own).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine_service.engine.batch import ScheduledBatch, ScheduledSequence
from engine_service.engine.config import EngineConfig
from engine_service.engine.model_runner import ModelRunner
from engine_service.engine.parallel.channel import StepChannel
from engine_service.engine.request import Request
from engine_service.engine.spec.proposers import Proposer
from engine_service.layers.paged_attention import AttentionBackend
from engine_service.layers.parallel import SINGLE, TensorParallel
from engine_service.models.config import ModelConfig
from engine_service.models.deepseek_v3 import DeepseekV3MTP, check_mtp_checkpoint, mtp_tensors
from engine_service.models.loader import _checkpoint_tensors, _weight_files, resolve_model_path
from engine_service.models.weights import load_weights, materialize

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Track:
    """One request's target hidden states for positions ``base ..`` that the MTP layer has
    not been fed yet (it has been fed everything below ``base`` it will ever get), under the
    request's preemption count ``epoch``."""

    request: Request
    epoch: int
    base: int
    hidden: torch.Tensor | None  # [positions, hidden]

    @property
    def end(self) -> int:
        return self.base + (0 if self.hidden is None else self.hidden.shape[0])


class MTPProposer(Proposer):
    """Greedy chains from the MTP layer; see the module docstring."""

    def __init__(
        self, runner: ModelRunner, mtp: DeepseekV3MTP, num_tokens: int, max_tokens: int
    ) -> None:
        self.runner = runner  # a ModelRunner over the MTP module and its cache
        self.mtp = mtp
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens
        self._tracks: dict[int, _Track] = {}

    def observe_target(self, batch: ScheduledBatch, hidden: torch.Tensor) -> None:
        """Keep the target's final hidden states of the step's rows, per request. Rows of
        drafts that will be rejected are kept too; only positions that end up known are
        read, and a later step's rows replace the others."""
        row = 0
        for seq in batch.sequences:
            request, n = seq.request, seq.num_tokens
            rows = hidden[row : row + n].detach().clone()
            row += n
            track = self._tracks.get(id(request))
            if (
                track is None
                or track.request is not request
                or track.epoch != request.num_preemptions
                or not track.base <= seq.start <= track.end
            ):
                # A new request, one recomputed after preemption, or positions that came
                # from the prefix cache: the MTP layer starts from this step's rows.
                self._tracks[id(request)] = _Track(
                    request, request.num_preemptions, seq.start, rows
                )
                continue
            if track.hidden is None or seq.start == track.base:
                track.hidden = rows
            else:
                track.hidden = torch.cat((track.hidden[: seq.start - track.base], rows))
        self._tracks = {k: t for k, t in self._tracks.items() if not t.request.is_finished}

    def propose(self, batch: ScheduledBatch) -> dict[int, list[int]]:
        catch_up: list[tuple[int, ScheduledSequence, torch.Tensor]] = []
        depth: dict[int, int] = {}
        for i, seq in enumerate(batch.sequences):
            if not seq.draft_room:
                continue
            request = seq.request
            track = self._tracks.get(id(request))
            last = request.num_tokens - 2  # the newest position with a target hidden state
            if (
                track is None
                or track.request is not request
                or track.epoch != request.num_preemptions
                or track.hidden is None
                or not track.base <= last < track.end
            ):
                continue
            first = track.base
            rows = track.hidden[: last + 1 - first]
            tokens = request.all_token_ids[first + 1 : last + 2]
            catch_up.append(
                (
                    i,
                    ScheduledSequence(
                        request, first, len(tokens), num_logits=1, draft_token_ids=list(tokens)
                    ),
                    rows,
                )
            )
            depth[i] = min(seq.draft_room, self.num_tokens)
            # Fed up to the newest hidden state; rows past it belonged to rejected drafts.
            track.base, track.hidden = last + 1, None
        if not catch_up:
            return {}
        logits, hidden = self._forward(catch_up)
        drafts = {i: [int(logits[i][0].argmax())] for i in depth}
        for step in range(1, max(depth.values())):
            chain = []
            for i in depth:
                if step < depth[i]:
                    request = batch.sequences[i].request
                    position = request.num_tokens - 2 + step
                    sequence = ScheduledSequence(
                        request, position, 1, num_logits=1, draft_token_ids=[drafts[i][-1]]
                    )
                    chain.append((i, sequence, hidden[i]))
            if not chain:
                break
            logits, new_hidden = self._forward(chain)
            for i, _, _ in chain:
                drafts[i].append(int(logits[i][0].argmax()))
                hidden[i] = new_hidden[i]
        return drafts

    def _forward(self, sequences) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """MTP logits and output hidden states of each ``(key, sequence, target hidden
        rows)``'s logits row, in forwards of at most ``max_tokens`` rows."""
        logits_out: dict[int, torch.Tensor] = {}
        hidden_out: dict[int, torch.Tensor] = {}
        group: list = []

        def flush() -> None:
            batch = ScheduledBatch()
            for _, sequence, _ in group:
                batch.sequences.append(sequence)
                batch.num_tokens += sequence.num_tokens
                batch.num_logits += sequence.num_logits
            self.mtp.previous_hidden = torch.cat([rows for _, _, rows in group])
            logits = self.runner.execute(batch, self.runner.prepare(batch))
            last_hidden = self.mtp.last_hidden
            assert last_hidden is not None
            for row, (key, _, _) in enumerate(group):
                logits_out[key] = logits[row : row + 1]
                hidden_out[key] = last_hidden[row : row + 1]
            group.clear()

        total = 0
        for entry in sequences:
            if group and total + entry[1].num_tokens > self.max_tokens:
                flush()
                total = 0
            group.append(entry)
            total += entry[1].num_tokens
        if group:
            flush()
        return logits_out, hidden_out


def build_mtp_proposer(
    num_tokens: int,
    config: EngineConfig,
    target_config: ModelConfig,
    target: torch.nn.Module,
    backend: AttentionBackend,
    num_blocks: int,
    max_model_len: int,
    tp: TensorParallel = SINGLE,
    channel: StepChannel | None = None,
) -> MTPProposer:
    """The proposer over :func:`load_mtp`'s layer; under tensor parallelism its runner
    sends each MTP step to the other ranks through ``channel``'s draft twin."""
    mtp, runner = load_mtp(
        config,
        target_config,
        target,
        backend,
        num_blocks,
        max_model_len,
        tp,
        channel.for_drafts() if channel is not None else None,
    )
    logger.info("speculative decoding: MTP layer of %s, %d tokens", config.model, num_tokens)
    return MTPProposer(runner, mtp, num_tokens, _max_tokens(config, max_model_len))


def _max_tokens(config: EngineConfig, max_model_len: int) -> int:
    # A sequence's first proposal feeds the MTP layer its whole prompt in one pass.
    return max(config.max_num_batched_tokens, max_model_len)


def load_mtp(
    config: EngineConfig,
    target_config: ModelConfig,
    target: torch.nn.Module,
    backend: AttentionBackend,
    num_blocks: int,
    max_model_len: int,
    tp: TensorParallel = SINGLE,
    channel: StepChannel | None = None,
) -> tuple[DeepseekV3MTP, ModelRunner]:
    """Load the checkpoint's first MTP layer beside the target (sharing its embedding, on
    its device; this rank's shards under ``tp``) with a latent cache over the target pool's
    block ids, and its runner; refuse a checkpoint without. Every rank of a parallel engine
    calls this (the other ranks from ``parallel/worker.py``)."""
    path = resolve_model_path(config.model, config.revision)
    ds_config = check_mtp_checkpoint(target_config, path)
    dtype = target.lm_head.weight.dtype
    device = target.lm_head.weight.device
    embed = target.model.embed_tokens
    with torch.device("meta"):
        mtp = DeepseekV3MTP(ds_config, embed, tp)
    materialize(mtp, device, dtype)
    try:
        load_weights(
            mtp,
            mtp_tensors(_checkpoint_tensors(_weight_files(path), str(device)), ds_config),
            str(path),
        )
    except ValueError as err:
        raise ValueError(
            f'speculative method "mtp": the checkpoint declares '
            f"{ds_config.num_mtp_layers} MTP layer(s) but its weights are incomplete: {err}"
        ) from None
    mtp.to(device)
    mtp.eval()
    cache = torch.zeros(
        (num_blocks + 1, *mtp.kv_block_shape(config.block_size)), dtype=dtype, device=device
    )
    runner = ModelRunner(
        mtp,
        backend,
        cache,
        config.block_size,
        max_num_tokens=_max_tokens(config, max_model_len),
        max_num_seqs=config.max_num_seqs,
        max_blocks_per_seq=-(-max_model_len // config.block_size),
        scratch_block=num_blocks,
        channel=channel,
        tp_size=tp.size,
    )
    return mtp, runner
