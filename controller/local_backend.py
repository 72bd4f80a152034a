"""The local backend: engine replicas as child processes of the controller on this machine.

Each replica runs ``engine_command + engine_args`` plus the flags that make it itself
(``--model``, ``--port``, ``--metrics-port``, ``--controller-address``, ``--replica-id``,
``--data-dir``) in its own process group, with stdout and stderr appended to
``<run_dir>/logs/<replica_id>.log`` (``run_dir`` defaults to ``data_dir``). Replica
``engine-k`` listens on ``engine_base_port + k`` and ``engine_base_metrics_port + k`` when
those are free, otherwise on ports the OS picks.

The backend survives its own controller: it records the engines it runs in
``<run_dir>/engines.json`` (pid, process start time, ordinal, address, and the pool's desired
size), and a controller that starts over the same ``run_dir`` adopts the engines that still
run instead of starting duplicates, and with them the desired size (``adopted_desired``), so
that a ``switchyard scale`` survives the controller's restart. An adopted engine is no child
of the new controller; it is watched through ``/proc`` (the start time guards against a
reused pid) and stopped by signalling its process group all the same. The engines register
again with the new controller on their own.

An engine that exits with :data:`~switchyard.exit_codes.CANNOT_START` shows as EXITED with
``cannot_start`` set to its own message (the last error line of its log), so that the
reconcile loop can give up instead of restarting it in a loop.

A stop sends SIGTERM to the replica's process group and SIGKILL once ``stop_grace_s`` has
passed; ``observe`` is where the deadline is enforced, so the reconcile loop's ticks drive it.
A process that ends without being asked to shows as EXITED; a run shorter than
``stable_after_s`` counts as one more consecutive failure (the plan's backoff grows with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
from switchyard.exit_codes import CANNOT_START

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
    run_dir: Path | None = None  # logs and engines.json; None: data_dir
    # Disaggregation: the pool these engines make up, and the --role they run with. Each
    # pool records its engines in a file of its own and takes ports from its own range.
    pool: str = "engines"
    role: str = "both"


@dataclass(slots=True)
class _Process:
    """One engine process: a child (``popen``) or adopted from a previous controller."""

    replica_id: str
    ordinal: int
    pid: int
    popen: subprocess.Popen[bytes] | None  # None when adopted
    log_file: IO[bytes] | None
    address: str
    started_at: float
    start_ticks: int  # /proc start time, which tells this process from a later one of its pid
    failures: int = 0
    exited_at: float | None = None
    stop_deadline: float | None = None  # set once a stop was ordered
    reaped: bool = False
    cannot_start: str = ""

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _start_ticks(self.pid) == self.start_ticks

    @property
    def returncode(self) -> int | None:
        """The exit status; None while it runs, and for an adopted process (not our child)."""
        return None if self.popen is None else self.popen.returncode


def _start_ticks(pid: int) -> int | None:
    """The start time of live, non-zombie process ``pid`` in clock ticks; None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22 of stat; fields[0] is field 3


def cannot_start_message(log_path: Path, max_bytes: int = 65536) -> str:
    """The reason an engine gave for not starting: the ``msg`` of its last ERROR log line, or
    else its last non-empty output line (argparse prints a usage error as plain text)."""
    try:
        with log_path.open("rb") as log_file:
            log_file.seek(max(log_path.stat().st_size - max_bytes, 0))
            lines = log_file.read().decode(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    plain = ""
    for line in reversed(lines):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            plain = plain or line
            continue
        if isinstance(record, dict) and record.get("level") in ("ERROR", "CRITICAL"):
            return str(record.get("msg", line)).removeprefix("engine cannot start: ")
    return plain or "(no output)"


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


# Where each pool's ports start, past the base ports: pools never contend for a port.
_POOL_PORT_OFFSETS = {"engines": 0, "prefill-engines": 40, "decode-engines": 80}


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
        run_dir = spec.run_dir or spec.data_dir
        self._log_dir = run_dir / "logs"
        self._state_path = run_dir / f"{spec.pool}.json"
        self._desired: int | None = None
        self.adopted_desired: int | None = None  # set when engines were adopted
        self._adopt()

    def record_desired(self, desired: int) -> None:
        """Remembers the pool's desired size for a controller that may follow this one."""
        self._desired = desired
        self._save()

    def log_path(self, replica_id: str) -> Path:
        return self._log_dir / f"{replica_id}.log"

    def _adopt(self) -> None:
        """Takes over the engines a previous controller recorded and that still run."""
        try:
            state = json.loads(self._state_path.read_text())
            recorded = state["engines"]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable engine state", extra={"error": str(exc)})
            return
        now = time.monotonic()
        for entry in recorded:
            try:
                pid, ticks = int(entry["pid"]), int(entry["start_ticks"])
                replica_id, ordinal = str(entry["replica_id"]), int(entry["ordinal"])
                address = str(entry["address"])
            except (KeyError, TypeError, ValueError):
                continue
            if _start_ticks(pid) != ticks:
                continue  # gone (or the pid now belongs to someone else)
            self._processes[replica_id] = _Process(
                replica_id=replica_id,
                ordinal=ordinal,
                pid=pid,
                popen=None,
                log_file=None,
                address=address,
                started_at=now,
                start_ticks=ticks,
            )
            log.info(
                "adopted running engine",
                extra={"replica_id": replica_id, "pid": pid, "address": address},
            )
        desired = state.get("desired")
        if self._processes and isinstance(desired, int) and desired >= 0:
            self.adopted_desired = self._desired = desired
        self._save()

    def _save(self) -> None:
        """Records the live engines for a controller that may follow this one."""
        engines = [
            {
                "replica_id": proc.replica_id,
                "ordinal": proc.ordinal,
                "pid": proc.pid,
                "start_ticks": proc.start_ticks,
                "address": proc.address,
            }
            for proc in self._processes.values()
            if not proc.reaped
        ]
        self._state_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self._state_path.with_suffix(".json.partial")
        partial.write_text(json.dumps({"desired": self._desired, "engines": engines}, indent=1))
        partial.replace(self._state_path)

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
                        extra={"replica_id": replica_id, "pid": proc.pid},
                    )
                    _signal_group(proc.pid, signal.SIGKILL)
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
                    cannot_start=proc.cannot_start if phase is Phase.EXITED else "",
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
        self._save()

    async def stop(self, replica_id: str) -> None:
        proc = self._processes.get(replica_id)
        if proc is None or proc.stop_deadline is not None:
            return
        proc.stop_deadline = time.monotonic() + self._stop_grace_s
        if proc.alive():
            log.info("stopping engine", extra={"replica_id": replica_id, "pid": proc.pid})
            _signal_group(proc.pid, signal.SIGTERM)

    async def close(self) -> None:
        # Each engine leads its own process group (pgid == its pid).
        groups = [process.pid for process in self._processes.values()]
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
        offset = ordinal + _POOL_PORT_OFFSETS.get(spec.pool, 0)
        port = _port_or_free(spec.host, spec.base_port + offset)
        metrics_port = _port_or_free(spec.host, spec.base_metrics_port + offset)
        for preferred, chosen in (
            (spec.base_port + offset, port),
            (spec.base_metrics_port + offset, metrics_port),
        ):
            if chosen != preferred:
                log.info(
                    "engine port taken; using another",
                    extra={"replica_id": replica_id, "taken": preferred, "chosen": chosen},
                )
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
            *(["--role", spec.role] if spec.role != "both" else []),
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
            pid=popen.pid,
            popen=popen,
            log_file=log_file,
            address=f"{spec.host}:{port}",
            started_at=time.monotonic(),
            start_ticks=_start_ticks(popen.pid) or 0,
            failures=failures,
        )

    def _on_crash(self, proc: _Process, now: float) -> None:
        ran_s = now - proc.started_at
        proc.failures = 1 if ran_s >= self._stable_after_s else proc.failures + 1
        proc.exited_at = now
        if proc.returncode == CANNOT_START:
            proc.cannot_start = cannot_start_message(self.log_path(proc.replica_id))
        log.error(
            "engine exited on its own",
            extra={
                "replica_id": proc.replica_id,
                "pid": proc.pid,
                "returncode": proc.returncode,
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
        _signal_group(proc.pid, signal.SIGKILL)
        if proc.log_file is not None:
            proc.log_file.close()
        self._save()
