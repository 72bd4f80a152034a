"""The local backend: engine replicas as child processes of the controller on this machine.

Each replica runs ``engine_command + engine_args`` plus the flags that make it itself
(``--model``, ``--port``, ``--metrics-port``, ``--controller-address``, ``--replica-id``,
``--data-dir``) in its own process group, with stdout and stderr appended to
``<data_dir>/logs/<replica_id>.log``. Replica ``engine-k`` listens on
``engine_base_port + k`` and ``engine_base_metrics_port + k`` when those are free, otherwise on
ports the OS picks.

A stop sends SIGTERM to the replica's process group and SIGKILL once ``stop_grace_s`` has
passed; ``observe`` is where the deadline is enforced, so the reconcile loop's ticks drive it.
A process that ends without being asked to shows as EXITED; a run shorter than
``stable_after_s`` counts as one more consecutive failure (the plan's backoff grows with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from controller.backend import Backend, Instance, Phase

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LocalEngineSpec:
    """How to start one engine process; everything but the per-replica flags."""

    command: list[str]
    model: str
    controller_address: str
    data_dir: Path
    host: str = "127.0.0.1"
    base_port: int = 50100
    base_metrics_port: int = 9100
    served_model_name: str = ""
    extra_args: tuple[str, ...] = ()
    log_level: str = "INFO"


@dataclass(slots=True)
class _Process:
    replica_id: str
    ordinal: int
    popen: subprocess.Popen[bytes]
    log_file: IO[bytes]
    address: str
    started_at: float
    failures: int = 0
    exited_at: float | None = None
    stop_deadline: float | None = None  # set once a stop was ordered
    reaped: bool = False

    def alive(self) -> bool:
        return self.popen.poll() is None


def _port_or_free(host: str, preferred: int) -> int:
    """``preferred`` when it can be bound on ``host`` now, else a port the OS picks."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As the engine's server will: a predecessor's TIME_WAIT does not block the port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError(f"no free port on {host}")


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


class LocalProcessBackend(Backend):
    """Engine replicas as local process groups (see the module docstring)."""

    def __init__(
        self, spec: LocalEngineSpec, stop_grace_s: float = 20.0, stable_after_s: float = 60.0
    ) -> None:
        self._spec = spec
        self._stop_grace_s = stop_grace_s
        self._stable_after_s = stable_after_s
        self._processes: dict[str, _Process] = {}
        self._log_dir = spec.data_dir / "logs"

    def log_path(self, replica_id: str) -> Path:
        return self._log_dir / f"{replica_id}.log"

    async def observe(self) -> list[Instance]:
        now = time.monotonic()
        instances = []
        for replica_id, proc in list(self._processes.items()):
            alive = proc.alive()
            if proc.stop_deadline is not None:
                if not alive:
                    self._reap(proc)
                    del self._processes[replica_id]
                    continue
                if now >= proc.stop_deadline:
                    log.warning(
                        "engine outlived its stop grace period; killing it",
                        extra={"replica_id": replica_id, "pid": proc.popen.pid},
                    )
                    _signal_group(proc.popen.pid, signal.SIGKILL)
                phase = Phase.STOPPING
            elif alive:
                phase = Phase.RUNNING
            else:
                if proc.exited_at is None:
                    self._on_crash(proc, now)
                phase = Phase.EXITED
            instances.append(
                Instance(
                    replica_id=replica_id,
                    ordinal=proc.ordinal,
                    phase=phase,
                    started_at=proc.started_at,
                    exited_at=proc.exited_at,
                    failures=proc.failures,
                    address=proc.address,
                )
            )
        return sorted(instances, key=lambda i: i.ordinal)

    async def start(self, replica_id: str, ordinal: int) -> None:
        proc = self._processes.get(replica_id)
        if proc is not None and (proc.alive() or proc.stop_deadline is not None):
            return
        failures = 0
        if proc is not None:
            if proc.exited_at is None:  # died between two observations
                self._on_crash(proc, time.monotonic())
            failures = proc.failures
        self._processes[replica_id] = self._spawn(replica_id, ordinal, failures)

    async def stop(self, replica_id: str) -> None:
        proc = self._processes.get(replica_id)
        if proc is None or proc.stop_deadline is not None:
            return
        proc.stop_deadline = time.monotonic() + self._stop_grace_s
        if proc.alive():
            log.info("stopping engine", extra={"replica_id": replica_id, "pid": proc.popen.pid})
            _signal_group(proc.popen.pid, signal.SIGTERM)

    async def close(self) -> None:
        # Each engine leads its own process group (pgid == its pid).
        groups = [process.popen.pid for process in self._processes.values()]
        for replica_id in list(self._processes):
            await self.stop(replica_id)
        while self._processes:
            await self.observe()  # reaps the exited, SIGKILLs past the deadline
            if self._processes:
                await asyncio.sleep(0.1)
        # An engine that exited may leave children still winding down: none outlives close.
        for pgid in groups:
            _signal_group(pgid, signal.SIGKILL)

    def _spawn(self, replica_id: str, ordinal: int, failures: int) -> _Process:
        spec = self._spec
        port = _port_or_free(spec.host, spec.base_port + ordinal)
        metrics_port = _port_or_free(spec.host, spec.base_metrics_port + ordinal)
        argv = [
            *spec.command,
            "--model", spec.model,
            "--host", spec.host,
            "--port", str(port),
            "--metrics-port", str(metrics_port),
            "--controller-address", spec.controller_address,
            "--replica-id", replica_id,
            "--data-dir", str(spec.data_dir),
            "--log-level", spec.log_level,
            *(["--served-model-name", spec.served_model_name] if spec.served_model_name else []),
            *spec.extra_args,
        ]  # fmt: skip
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.log_path(replica_id).open("ab")
        try:
            # Its own session: a terminal's Ctrl-C reaches the controller only, which stops the
            # engines in order, and one killpg reaches whatever the engine itself spawned.
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError:
            log_file.close()
            raise
        log.info(
            "started engine",
            extra={
                "replica_id": replica_id,
                "pid": popen.pid,
                "port": port,
                "metrics_port": metrics_port,
                "log": str(self.log_path(replica_id)),
                "failures": failures,
            },
        )
        return _Process(
            replica_id=replica_id,
            ordinal=ordinal,
            popen=popen,
            log_file=log_file,
            address=f"{spec.host}:{port}",
            started_at=time.monotonic(),
            failures=failures,
        )

    def _on_crash(self, proc: _Process, now: float) -> None:
        ran_s = now - proc.started_at
        proc.failures = 1 if ran_s >= self._stable_after_s else proc.failures + 1
        proc.exited_at = now
        log.error(
            "engine exited on its own",
            extra={
                "replica_id": proc.replica_id,
                "pid": proc.popen.pid,
                "returncode": proc.popen.returncode,
                "ran_s": round(ran_s, 1),
                "failures": proc.failures,
                "log": str(self.log_path(proc.replica_id)),
            },
        )
        self._reap(proc)

    def _reap(self, proc: _Process) -> None:
        if proc.reaped:
            return
        proc.reaped = True
        # The leader is gone; anything it left in its group goes with it.
        _signal_group(proc.popen.pid, signal.SIGKILL)
        proc.log_file.close()
