"""The ranks of one parallel engine: who starts them, how they join, and what a death does.

::

    engine service process = rank 0                      rank r (1 .. N-1), child process
      LLMEngine: scheduler, sampler, gRPC around it        python -m engine_service.engine.parallel.worker
      WorkerRanks.start() ──spawns──────────────────────▶  init_distributed(rank r)
      init_distributed(rank 0) ◀── tcp rendezvous ──────▶  load this rank's shards
      load this rank's shards, agree on the KV pool  ◀──▶  agree on the KV pool
      each step: StepChannel.send_* ───── broadcast ────▶  StepChannel.recv -> run_step
      close(): SHUTDOWN ───────────────────────────────▶  exit 0

One engine drives all its ranks, so the controller, the gateway and ``switchyard status``
see one replica. The ranks live and die together: rank 0 watches every child, and a child
that exits while the engine runs takes rank 0 down at once (log line ``engine rank R
exited ...``, exit status 1, which a supervisor restarts; :data:`CANNOT_START` when that
rank could not start). A child whose rank 0 is gone exits too (its broadcast fails, or its
parent changes). Children ignore SIGINT and SIGTERM: a stop reaches them as rank 0's
SHUTDOWN, after rank 0 has drained its requests.

The ranks use the process's default ``torch.distributed`` group (NCCL on CUDA, gloo on the
CPU), so one process runs at most one parallel engine.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from engine_service.engine.config import EngineConfig
from engine_service.layers.parallel import TensorParallel
from switchyard.exit_codes import CANNOT_START
from switchyard.ports import any_free_port

logger = logging.getLogger(__name__)

# The CPU group waits for the next step without a deadline (see channel.py); a dead peer
# fails it through its closed sockets instead.
_NO_DEADLINE = datetime.timedelta(days=3650)
# Joining the group and loading the model: longer than any load, shorter than forever.
_START_TIMEOUT = datetime.timedelta(minutes=30)
# How a rank opens the remote KV store: RemoteKVStore.reopen_spec(), as JSON.
KV_STORE_ENV = "SWITCHYARD_ENGINE_RANK_KV_STORE"


def rank_device(device: str, rank: int) -> torch.device:
    """Rank ``r`` of an engine on ``cuda:k`` (or ``cuda``, k = 0) runs on ``cuda:k+r``."""
    base = torch.device(device)
    if base.type != "cuda":
        return base
    return torch.device("cuda", (base.index or 0) + rank)


@dataclasses.dataclass(slots=True)
class RankContext:
    """What one rank needs to run its share: its place and the groups it talks through."""

    rank: int
    world_size: int
    device: torch.device
    tp: TensorParallel
    cpu_group: Any  # gloo, for step headers and host data
    device_group: Any  # the device's backend (None: the default group)
    # With KV offload, per data-parallel rank: the gloo group of rank 0 and the ranks of
    # that rank's KV pool, for remote store tasks (parallel/offload_link.py); None where
    # rank 0 holds the whole pool.
    offload_groups: tuple[Any, ...] = ()

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over the ranks (each sizes its own KV pool)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())


def init_distributed(config: EngineConfig, rank: int, address: str) -> RankContext:
    """Join the engine's ranks at ``address`` (``host:port`` of rank 0's rendezvous)."""
    if dist.is_initialized():
        raise RuntimeError(
            "this process already runs a parallel engine; one per process (torch.distributed "
            "has one default group)"
        )
    world = config.world_size
    device = rank_device(config.device, rank)
    if device.type == "cuda":
        if torch.cuda.device_count() <= (device.index or 0):
            raise ValueError(
                f"engine rank {rank} needs {device}, but {torch.cuda.device_count()} CUDA "
                f"devices are visible (tensor_parallel_size x data_parallel_size = {world})"
            )
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    timeout = _NO_DEADLINE if backend == "gloo" else _START_TIMEOUT
    dist.init_process_group(
        backend, init_method=f"tcp://{address}", rank=rank, world_size=world, timeout=timeout
    )
    cpu_group = (
        dist.group.WORLD
        if backend == "gloo"
        else dist.new_group(backend="gloo", timeout=_NO_DEADLINE)
    )
    tp_size, dp_size = config.tensor_parallel_size, config.data_parallel_size
    # Global rank d * tp_size + t is rank t of data-parallel rank d's tensor-parallel group;
    # the expert-parallel group is the world. Every rank makes every group, in one order.
    tp_group = None
    if dp_size > 1 and tp_size > 1:
        groups = [
            dist.new_group(list(range(d * tp_size, (d + 1) * tp_size)), timeout=timeout)
            for d in range(dp_size)
        ]
        tp_group = groups[rank // tp_size]
    tp = TensorParallel(
        rank % tp_size,
        tp_size,
        tp_group,
        expert_parallel=config.enable_expert_parallel,
        dp_rank=rank // tp_size,
        dp_size=dp_size,
    )
    offload_groups = []
    if config.enable_kv_offload:
        for d in range(dp_size):
            members = sorted({0, *range(d * tp_size, (d + 1) * tp_size)})
            group = None
            if len(members) > 1:  # idle between tasks for as long as the engine is
                group = dist.new_group(members, backend="gloo", timeout=_NO_DEADLINE)
            offload_groups.append(group)
    return RankContext(rank, world, device, tp, cpu_group, None, tuple(offload_groups))


def config_to_json(config: EngineConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def config_from_json(text: str) -> EngineConfig:
    fields = json.loads(text)
    fields["lora_modules"] = tuple(tuple(m) for m in fields["lora_modules"])
    return EngineConfig(**fields)


def _exit_process(rank: int, code: int | None) -> None:
    """Rank 0's answer to a dead rank: the replica cannot step without it."""
    status = CANNOT_START if code == CANNOT_START else 1
    logger.error(
        "engine rank %d exited (status %s); the replica stops with it",
        rank,
        code,
        extra={"rank": rank, "exit_status": code},
    )
    logging.shutdown()
    os._exit(status)


class WorkerRanks:
    """Rank 0's handle on ranks ``1 .. N-1``: starts, watches and stops their processes.

    ``on_rank_exit(rank, status)`` runs (on a watcher thread) when a rank exits before
    :meth:`close`; the default ends this process (see the module docstring).
    """

    def __init__(
        self,
        config: EngineConfig,
        on_rank_exit: Callable[[int, int | None], None] = _exit_process,
        kv_store_spec: tuple[str, dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.kv_store_spec = kv_store_spec
        self.address = f"127.0.0.1:{any_free_port('127.0.0.1')}"
        self._on_rank_exit = on_rank_exit
        self._closing = threading.Event()
        self.processes: list[subprocess.Popen] = []

    def start(self) -> None:
        """Spawn the other ranks (they join :func:`init_distributed` at ``address``)."""
        env = {**os.environ, "SWITCHYARD_ENGINE_RANK_CONFIG": config_to_json(self.config)}
        if self.kv_store_spec is not None:  # each rank opens the remote KV store itself
            env[KV_STORE_ENV] = json.dumps(self.kv_store_spec)
        for rank in range(1, self.config.world_size):
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "engine_service.engine.parallel.worker",
                    "--rank",
                    str(rank),
                    "--address",
                    self.address,
                    "--parent-pid",
                    str(os.getpid()),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
            )
            self.processes.append(proc)
            logger.info("engine rank %d started", rank, extra={"rank": rank, "pid": proc.pid})
            threading.Thread(
                target=self._watch, args=(rank, proc), name=f"engine-rank-{rank}", daemon=True
            ).start()

    def _watch(self, rank: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if not self._closing.is_set():
            self._on_rank_exit(rank, code)

    def close(self, channel_shutdown: Callable[[], None] | None, timeout_s: float = 30.0) -> None:
        """Tell the ranks to stop (``channel_shutdown``; ``None``: they are killed, as after a
        failed start), wait up to ``timeout_s`` for them, kill stragglers."""
        self._closing.set()
        if channel_shutdown is not None:
            try:
                channel_shutdown()
            except RuntimeError as exc:  # a rank already gone: the others are killed below
                logger.warning("engine ranks did not all take the shutdown: %s", exc)
        for proc in self.processes:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
