"""A rank other than 0: loads its shards, then runs every step rank 0 broadcasts, until told
to stop or until rank 0 is gone (see :mod:`engine_service.engine.parallel.ranks`).

Started by rank 0 as ``python -m engine_service.engine.parallel.worker --rank R --address
HOST:PORT --parent-pid PID`` with the engine's config (JSON) in
``SWITCHYARD_ENGINE_RANK_CONFIG`` and, when the engine offloads to a remote KV store, how to
open it in ``SWITCHYARD_ENGINE_RANK_KV_STORE`` (the rank then runs rank 0's store tasks on
an I/O thread of its own, :func:`~engine_service.engine.parallel.offload_link.serve_tasks`).
Exit status 0 after a SHUTDOWN, :data:`CANNOT_START` when the config or checkpoint does not
fit, 1 when rank 0 went away.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch

from engine_service.engine.attention import get_attention_backend
from engine_service.engine.config import EngineConfig
from engine_service.engine.lora_manager import apply_slot_write, attach_adapter_slots
from engine_service.engine.memory import allocate_kv_cache, kv_block_bytes, num_kv_blocks
from engine_service.engine.model_runner import ModelRunner
from engine_service.engine.offload import RemoteKVStore, open_remote_store
from engine_service.engine.offload_rank import RankOffload, rank_kv_fingerprint
from engine_service.engine.parallel.channel import Kind, StepChannel
from engine_service.engine.parallel.offload_link import serve_tasks
from engine_service.engine.parallel.ranks import (
    KV_STORE_ENV,
    RankContext,
    config_from_json,
    init_distributed,
)
from engine_service.engine.spec.ranks import DraftRank, build_draft_rank
from engine_service.layers.lora import TorchLoRA
from engine_service.models.loader import attention_needs, load_model
from switchyard.exit_codes import CANNOT_START
from switchyard.log import setup_logging

logger = logging.getLogger("engine_service.rank")

_PARENT_POLL_S = 0.5
_CONFIG_ERRORS = (ValueError, LookupError, NotImplementedError, OSError)


def _exit_when_orphaned(parent_pid: int, rank: int) -> None:
    """A rank outlives its rank 0 by at most a poll: a collective it waits in (NCCL) may
    never fail on its own."""
    while True:
        if os.getppid() != parent_pid:
            logger.error("engine rank %d: rank 0 is gone; exiting", rank)
            logging.shutdown()
            os._exit(1)
        time.sleep(_PARENT_POLL_S)


@dataclass(slots=True)
class Rank:
    """What a rank runs: its runner, its adapter slots' deltas (``None`` without LoRA),
    which rank 0's slot writes fill (:func:`apply_slot_write`), its part in drafting
    (``None`` when the proposer gives it none): the MTP layers' or a draft model's shard, or
    an EAGLE head, and its side of KV offload (``None`` without)."""

    ctx: RankContext
    runner: ModelRunner
    lora_deltas: dict[str, TorchLoRA] | None
    drafter: DraftRank | None = None
    offload: RankOffload | None = None


def load_rank(ctx: RankContext, config: EngineConfig, remote: RemoteKVStore | None = None) -> Rank:
    """Load this rank's shards and size the KV pool with the other ranks (as rank 0's
    :class:`LLMEngine` does, in the same order of collectives); with speculation, this
    rank's part of the proposer's model too (before the runner: an EAGLE head has the target
    keep its features); with offload, the rank's host tier and its link to the ``remote``
    store."""
    backend = get_attention_backend(
        config.attention_backend, ctx.device, attention_needs(config.model, config.revision)
    )
    model, model_config, dtype = load_model(
        config.model, backend, config.dtype, ctx.device, config.revision, ctx.tp
    )
    # Empty adapter slots, as rank 0's LoRAManager makes them (and before the KV pool is
    # sized, as there); rank 0 sends every slot write.
    lora_slots = lora_deltas = None
    if config.enable_lora:
        lora_slots, lora_deltas = attach_adapter_slots(
            model, config.max_loras, config.max_lora_rank
        )
    num_blocks = ctx.agree_min(num_kv_blocks(config, model_config, dtype, ctx.device))
    limit = min(
        config.max_model_len or model_config.max_position_embeddings, num_blocks * config.block_size
    )
    kv_cache = allocate_kv_cache(
        num_blocks, config.block_size, model_config, dtype, ctx.device, ctx.tp.size
    )
    drafter = build_draft_rank(
        config, model_config, model, backend, num_blocks, limit, ctx.device, ctx.tp
    )
    runner = ModelRunner(
        model,
        backend,
        kv_cache,
        config.block_size,
        max_num_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
        max_blocks_per_seq=-(-limit // config.block_size),
        scratch_block=num_blocks,
        lora_slots=lora_slots,
        tp_size=ctx.tp.size,
        hidden_store=drafter.hidden_store if drafter is not None else None,
    )
    offload = None
    if config.enable_kv_offload:
        fingerprint, first = rank_kv_fingerprint(
            config.model, model_config, config.block_size, kv_cache, ctx.tp
        )
        block_bytes = kv_block_bytes(model_config, config.block_size, dtype, ctx.tp.size)
        num_slots = config.kv_offload_host_bytes // block_bytes
        offload = RankOffload(kv_cache, num_slots, fingerprint, remote, stores_blocks=first)
    logger.info("engine rank %d ready: %d KV blocks", ctx.rank, num_blocks)
    return Rank(ctx, runner, lora_deltas, drafter, offload)


def run_steps(rank: Rank) -> None:
    """Run what rank 0 broadcasts until its SHUTDOWN: the target's steps on the rank's
    runner, draft steps on its drafter. Under data parallelism a rank gets its data-parallel
    rank's steps from rank 0 alone, and the first rank of each tensor-parallel group sends
    the logits rows back (and after an EAGLE head's draft step, its output rows)."""
    ctx, runner, drafter = rank.ctx, rank.runner, rank.drafter
    data_parallel = ctx.tp.dp_size > 1
    channel = StepChannel(
        ctx.device, ctx.cpu_group, ctx.device_group, peers=(0,) if data_parallel else None
    )
    lora_dtype = None
    if rank.lora_deltas is not None:
        lora_dtype = next(iter(rank.lora_deltas.values())).lora_a_all.dtype
    while True:
        message = channel.recv(lora_dtype)
        if message.kind == Kind.SHUTDOWN:
            return
        if message.kind == Kind.MOVES:
            runner.move_slots(message.moves)
            continue
        if message.kind == Kind.LORA:
            assert rank.lora_deltas is not None and message.slot_write is not None
            apply_slot_write(rank.lora_deltas, message.slot_write)
            continue
        if message.kind == Kind.OFFLOAD:
            assert rank.offload is not None, "an offload op reached a rank without offload"
            assert message.offload is not None
            rank.offload.apply(*message.offload)
            continue
        step = message.step
        if message.kind == Kind.DRAFT_STEP:
            assert drafter is not None, "a draft step reached a rank without a proposer"
            logits, rows = drafter.run(step)
            if data_parallel and ctx.tp.rank == 0:  # the group's first: gathered logits
                assert logits is not None
                channel.send_logits(logits)
                if rows is not None:
                    channel.send_logits(rows)
            continue
        logits = runner.run_step(step.inputs.input_ids, step.inputs, step.block_copies)
        # The first rank of each data-parallel rank's tensor-parallel group gathered them.
        if data_parallel and logits is not None and step.inputs.logits_indices.numel():
            channel.send_logits(logits)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine_service.engine.parallel.worker")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    setup_logging("engine", os.environ.get("SWITCHYARD_LOG_LEVEL", "INFO"))
    # A stop reaches this rank through rank 0 (SHUTDOWN, after draining), never directly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(
        target=_exit_when_orphaned, args=(args.parent_pid, args.rank), daemon=True
    ).start()
    config = config_from_json(os.environ["SWITCHYARD_ENGINE_RANK_CONFIG"])
    torch.manual_seed(config.seed)
    try:
        ctx = init_distributed(config, args.rank, args.address)
        remote = None
        if KV_STORE_ENV in os.environ:
            remote = open_remote_store(tuple(json.loads(os.environ[KV_STORE_ENV])))
        rank = load_rank(ctx, config, remote)
    except _CONFIG_ERRORS as exc:
        logger.error("engine rank %d cannot start: %s", args.rank, exc)
        sys.exit(CANNOT_START)
    if remote is not None:
        assert rank.offload is not None
        group = ctx.offload_groups[ctx.tp.dp_rank]
        threading.Thread(
            target=serve_tasks,
            args=(rank.offload, group, args.rank),
            name="kv-offload-io",
            daemon=True,
        ).start()
    try:
        run_steps(rank)
    except Exception as exc:  # a collective failed: rank 0 or a peer is gone
        logger.error("engine rank %d lost its peers: %s", args.rank, exc)
        sys.exit(1)
    logger.info("engine rank %d stopped", args.rank)


if __name__ == "__main__":
    main()
