"""Keeping the processes of a local stack running: what ``switchyard up`` supervises.

Each service (the KV service, the controller, the gateway) runs in its own process group with
its output appended to ``<log_dir>/<name>.log``. :meth:`Supervisor.poll` notices a service
that exited and starts it again with the same command line, after a backoff that starts at
``backoff_initial_s`` and doubles per consecutive quick failure up to ``backoff_max_s`` (a run
of ``stable_after_s`` or more resets it). The rest of the stack keeps running meanwhile: the
KV service is a cache whose outage engines treat as misses, gateways and engines keep serving
on the last routing table while the controller is away, and a restarted controller adopts the
engines that still run.

A service that exits with a status in :data:`GIVE_UP_STATUSES` said that a restart cannot help
(status 2: its flags or settings were refused; :data:`~switchyard.exit_codes.CANNOT_START`:
something it needs is unusable, such as an engine's model): ``poll`` returns a
:class:`ServiceFailed` with the end of its log instead of restarting it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from switchyard.exit_codes import CANNOT_START

GIVE_UP_STATUSES = frozenset({2, CANNOT_START})


def describe_status(returncode: int) -> str:
    """``status 3`` or ``killed by SIGKILL``."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"status {returncode}"


@dataclass(slots=True)
class Service:
    """One supervised process and its restart bookkeeping."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    log_file: IO[bytes]
    started_at: float
    label: str = ""  # how messages name it; "" means its name
    restarts: int = 0
    failures: int = 0  # consecutive runs shorter than stable_after_s
    restart_at: float | None = None  # set while it waits for its backoff

    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def shown(self) -> str:
        return self.label or self.name

    def signal_group(self, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signum)

    def wait(self, timeout_s: float) -> bool:
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def log_tail(self, lines: int = 20) -> str:
        self.log_file.flush()
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True, slots=True)
class ServiceFailed:
    """A service that exited in a way a restart cannot fix."""

    name: str
    returncode: int
    log_tail: str
    log_path: Path

    def reason(self) -> str:
        """Its own last words when it ended with one plain line (as the controller does for an
        engine that cannot start), else the end of its log."""
        lines = [line for line in self.log_tail.splitlines() if line.strip()]
        if lines and not lines[-1].lstrip().startswith(("{", " ", "Traceback")):
            return lines[-1]
        return self.log_tail


class Supervisor:
    """Starts services and restarts the ones that exit (see the module docstring)."""

    def __init__(
        self,
        log_dir: Path,
        env: dict[str, str],
        *,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 10.0,
        stable_after_s: float = 30.0,
        report: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log_dir = log_dir
        self._env = env
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._stable_after_s = stable_after_s
        self._report = report
        self._clock = clock
        self.services: list[Service] = []

    def start(self, name: str, argv: list[str], label: str = "") -> Service:
        """Starts ``argv`` as service ``name`` (its log is ``<name>.log``; messages call it
        ``label`` when given); it is supervised from now on."""
        log_path = self._log_dir / f"{name}.log"
        popen, log_file = self._spawn(argv, log_path)
        service = Service(name, argv, log_path, popen, log_file, self._clock(), label)
        self.services.append(service)
        return service

    def _spawn(self, argv: list[str], log_path: Path) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
        log_file = log_path.open("ab")
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,
            )
        except OSError:
            log_file.close()
            raise
        return popen, log_file

    def poll(self) -> ServiceFailed | None:
        """Restarts what exited and is due; returns the first service that cannot be helped."""
        now = self._clock()
        for service in self.services:
            if service.alive():
                continue
            returncode = service.popen.returncode
            if service.restart_at is None:
                if returncode in GIVE_UP_STATUSES:
                    return ServiceFailed(
                        service.shown, returncode, service.log_tail(), service.log_path
                    )
                ran_s = now - service.started_at
                service.failures = 1 if ran_s >= self._stable_after_s else service.failures + 1
                backoff = min(
                    self._backoff_initial_s * 2 ** (service.failures - 1), self._backoff_max_s
                )
                service.restart_at = now + backoff
                self._report(
                    f"the {service.shown} exited ({describe_status(returncode)}); restarting it "
                    f"in {backoff:.1f} s; its log: {service.log_path}"
                )
                service.signal_group(signal.SIGKILL)  # whatever it left in its group
            if now >= service.restart_at:
                service.log_file.close()
                service.popen, service.log_file = self._spawn(service.argv, service.log_path)
                service.started_at = now
                service.restart_at = None
                service.restarts += 1
                self._report(f"restarted the {service.shown} (pid {service.popen.pid})")
        return None

    def stop(self, timeouts_s: dict[str, float], default_timeout_s: float) -> list[str]:
        """SIGTERM to every service, then SIGKILL to each group that outlives its timeout;
        returns the names of those that had to be killed."""
        for service in self.services:
            service.signal_group(signal.SIGTERM)
        killed = []
        for service in self.services:
            if not service.wait(timeouts_s.get(service.name, default_timeout_s)):
                killed.append(service.shown)
            service.signal_group(signal.SIGKILL)  # its group: whatever it left behind
            service.wait(5.0)
            service.log_file.close()
        return killed
