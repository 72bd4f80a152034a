"""The supervisor of ``switchyard up`` with real processes: a crashed service comes back with
the same command line and the same log; one that says it cannot start is not restarted."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from switchyard.exit_codes import CANNOT_START
from switchyard.supervisor import Supervisor

SERVICE = (
    "import os, sys, time; print('up', os.getpid(), sys.argv[1:], flush=True); time.sleep(600)"
)


def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[tuple[Supervisor, list[str]]]:
    reports: list[str] = []
    supervisor = Supervisor(
        tmp_path, dict(os.environ), backoff_initial_s=0.1, report=reports.append
    )
    yield supervisor, reports
    supervisor.stop({}, 5.0)


def started(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("up ")]


def test_a_killed_service_is_restarted_with_the_same_command_and_log(
    supervisor: tuple[Supervisor, list[str]],
) -> None:
    sup, reports = supervisor
    service = sup.start(
        "kv", [sys.executable, "-c", SERVICE, "--port", "50060"], label="KV service"
    )
    wait_for(lambda: started(service.log_path))
    first_pid = service.popen.pid
    os.kill(first_pid, signal.SIGKILL)
    wait_for(lambda: sup.poll() is None and service.restarts == 1 and service.alive())
    wait_for(lambda: len(started(service.log_path)) == 2)
    second = started(service.log_path)[1]
    assert service.popen.pid != first_pid
    assert "'--port', '50060'" in second
    assert service.log_path.name == "kv.log"
    assert any("the KV service exited (killed by SIGKILL); restarting it" in r for r in reports)


def test_quick_repeated_crashes_back_off(supervisor: tuple[Supervisor, list[str]]) -> None:
    sup, reports = supervisor
    service = sup.start("gateway", [sys.executable, "-c", "import sys; sys.exit(3)"])
    wait_for(lambda: sup.poll() is None and service.restarts >= 2, timeout_s=10)
    delays = [r for r in reports if "exited (status 3)" in r]
    assert "in 0.1 s" in delays[0] and "in 0.2 s" in delays[1]


@pytest.mark.parametrize("status", [2, CANNOT_START])
def test_a_service_that_cannot_start_is_not_restarted(
    supervisor: tuple[Supervisor, list[str]], status: int
) -> None:
    sup, _ = supervisor
    code = f"print('engine-0 cannot start: unsupported architecture', flush=True); exit({status})"
    service = sup.start("controller", [sys.executable, "-c", code])
    wait_for(lambda: not service.alive())
    failed = sup.poll()
    assert failed is not None
    assert (failed.name, failed.returncode) == ("controller", status)
    assert "engine-0 cannot start: unsupported architecture" in failed.log_tail
    assert failed.reason() == "engine-0 cannot start: unsupported architecture"
    assert service.restarts == 0


def test_stop_ends_every_service(supervisor: tuple[Supervisor, list[str]]) -> None:
    sup, _ = supervisor
    services = [sup.start(name, [sys.executable, "-c", SERVICE]) for name in ("kv", "gateway")]
    assert sup.stop({}, 5.0) == []
    assert not any(service.alive() for service in services)
