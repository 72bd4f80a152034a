"""The local backend with real processes: a stand-in engine (a Python one-liner that sleeps and
spawns a child) is started, crashed, restarted by the reconcile loop, and stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controller.backend import Instance, Phase
from controller.local_backend import LocalEngineSpec, LocalProcessBackend
from controller.plan import RestartPolicy
from controller.reconciler import EngineCannotStart, Reconciler
from controller.registry import ReplicaRegistry
from switchyard.exit_codes import CANNOT_START

FAKE_ENGINE = """
import os, signal, subprocess, sys, time
if os.environ.get("FAKE_ENGINE_IGNORES_SIGTERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("pid", os.getpid(), "child", child.pid, "argv", " ".join(sys.argv[1:]), flush=True)
time.sleep(600)
"""


# An engine that finds its configuration unusable: it logs why (as the real one does, one
# JSON line) and exits with the status that says a restart cannot help.
UNSTARTABLE_ENGINE = f"""
import json, sys
print(json.dumps({{"level": "ERROR", "msg": "engine cannot start: architecture Foo is not supported"}}))
sys.exit({CANNOT_START})
"""


def make_backend(
    data_dir: Path, stop_grace_s: float = 5.0, engine: str = FAKE_ENGINE
) -> LocalProcessBackend:
    spec = LocalEngineSpec(
        command=[sys.executable, "-c", engine],
        model="/models/tiny",
        controller_address="127.0.0.1:1",
        data_dir=data_dir,
        extra_args=("--device", "cpu"),
    )
    return LocalProcessBackend(spec, stop_grace_s=stop_grace_s, stable_after_s=60.0)


def wait_for(predicate: Callable[[], object], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def started_lines(backend: LocalProcessBackend, replica_id: str) -> list[str]:
    path = backend.log_path(replica_id)
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line.startswith("pid ")]


def pids(line: str) -> tuple[int, int]:
    words = line.split()
    return int(words[1]), int(words[3])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; it is dead for our purpose.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


def observe(backend: LocalProcessBackend) -> list[Instance]:
    return asyncio.run(backend.observe())


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[LocalProcessBackend]:
    backend = make_backend(tmp_path)
    yield backend
    asyncio.run(backend.close())


def test_start_runs_the_engine_with_its_flags_and_logs(backend: LocalProcessBackend) -> None:
    asyncio.run(backend.start("engine-0", 0))
    wait_for(lambda: started_lines(backend, "engine-0"))
    line = started_lines(backend, "engine-0")[0]
    for flag in ("--model /models/tiny", "--replica-id engine-0", "--device cpu"):
        assert flag in line
    [instance] = observe(backend)
    assert instance.phase is Phase.RUNNING
    assert f"--port {instance.address.rsplit(':', 1)[1]}" in line


def test_start_of_a_running_replica_does_nothing(backend: LocalProcessBackend) -> None:
    asyncio.run(backend.start("engine-0", 0))
    asyncio.run(backend.start("engine-0", 0))
    wait_for(lambda: started_lines(backend, "engine-0"))
    time.sleep(0.5)
    assert len(started_lines(backend, "engine-0")) == 1


def test_killed_engine_shows_exited_and_the_loop_restarts_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        backend = make_backend(tmp_path)
        registry = ReplicaRegistry(6.0, 30.0)
        policy = RestartPolicy(backoff_initial_s=0.5, backoff_max_s=1.0)
        reconciler = Reconciler(registry, backend, 1, policy)
        try:
            await reconciler.reconcile_once()
            await asyncio.to_thread(wait_for, lambda: started_lines(backend, "engine-0"))
            first_pid, first_child = pids(started_lines(backend, "engine-0")[0])

            os.kill(first_pid, signal.SIGKILL)
            await asyncio.to_thread(wait_for, lambda: not alive(first_pid))
            await reconciler.reconcile_once()
            [crashed] = reconciler.instances()
            assert crashed.phase is Phase.EXITED and crashed.failures == 1
            await asyncio.to_thread(wait_for, lambda: not alive(first_child))  # group reaped

            await asyncio.sleep(0.6)  # the backoff
            await reconciler.reconcile_once()
            [restarted] = reconciler.instances()
            assert restarted.phase is Phase.RUNNING
            assert restarted.replica_id == "engine-0"
            await asyncio.to_thread(wait_for, lambda: len(started_lines(backend, "engine-0")) == 2)
            second_pid, _ = pids(started_lines(backend, "engine-0")[1])
            assert second_pid != first_pid and alive(second_pid)
        finally:
            await backend.close()

    asyncio.run(scenario())


def test_quick_repeated_crashes_count_up(backend: LocalProcessBackend) -> None:
    for expected_failures in (1, 2, 3):
        before = len(started_lines(backend, "engine-0"))
        asyncio.run(backend.start("engine-0", 0))
        wait_for(lambda before=before: len(started_lines(backend, "engine-0")) > before)
        pid, _ = pids(started_lines(backend, "engine-0")[-1])
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda pid=pid: not alive(pid))
        [instance] = observe(backend)
        assert instance.phase is Phase.EXITED
        assert instance.failures == expected_failures


def test_stop_terminates_the_whole_process_group(backend: LocalProcessBackend) -> None:
    asyncio.run(backend.start("engine-0", 0))
    wait_for(lambda: started_lines(backend, "engine-0"))
    pid, child = pids(started_lines(backend, "engine-0")[0])
    asyncio.run(backend.stop("engine-0"))
    assert [i.phase for i in observe(backend)] in ([Phase.STOPPING], [])
    wait_for(lambda: observe(backend) == [])
    assert not alive(pid)
    # The child got the group's SIGTERM too; on a loaded machine it may take a moment to go.
    wait_for(lambda: not alive(child), timeout_s=10)


def test_engine_ignoring_sigterm_is_killed_after_the_grace_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ENGINE_IGNORES_SIGTERM", "1")
    backend = make_backend(tmp_path, stop_grace_s=1.0)
    try:
        asyncio.run(backend.start("engine-0", 0))
        wait_for(lambda: started_lines(backend, "engine-0"))
        pid, child = pids(started_lines(backend, "engine-0")[0])
        asyncio.run(backend.stop("engine-0"))
        time.sleep(0.5)
        assert [i.phase for i in observe(backend)] == [Phase.STOPPING]
        assert alive(pid)
        wait_for(lambda: observe(backend) == [], timeout_s=10)
        assert not alive(pid)
        assert not alive(child)
    finally:
        asyncio.run(backend.close())


def test_close_stops_every_engine(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    for ordinal in range(2):
        asyncio.run(backend.start(f"engine-{ordinal}", ordinal))
    wait_for(lambda: all(started_lines(backend, f"engine-{i}") for i in range(2)))
    everyone = [p for i in range(2) for p in pids(started_lines(backend, f"engine-{i}")[0])]
    asyncio.run(backend.close())
    assert observe(backend) == []
    # SIGKILL is delivered asynchronously; it lands within moments.
    wait_for(lambda: not any(alive(pid) for pid in everyone), timeout_s=5)


def test_a_new_backend_adopts_the_engines_a_previous_one_left_running(tmp_path: Path) -> None:
    """A controller killed with SIGKILL leaves its engines serving; the next one over the same
    run_dir takes them over (same pid, same address) instead of starting duplicates."""
    first = make_backend(tmp_path)
    asyncio.run(first.start("engine-0", 0))
    wait_for(lambda: started_lines(first, "engine-0"))
    pid, child = pids(started_lines(first, "engine-0")[0])
    [before] = observe(first)

    second = make_backend(tmp_path)  # the first is abandoned, as a killed controller's is
    try:
        [adopted] = observe(second)
        assert adopted.phase is Phase.RUNNING
        assert (adopted.replica_id, adopted.ordinal) == ("engine-0", 0)
        assert adopted.address == before.address
        asyncio.run(second.start("engine-0", 0))  # already running: no second process
        time.sleep(0.3)
        assert len(started_lines(second, "engine-0")) == 1

        asyncio.run(second.stop("engine-0"))
        wait_for(lambda: observe(second) == [])
        assert not alive(pid)
        # The child's signal lands asynchronously; on a loaded machine it may take moments.
        wait_for(lambda: not alive(child), timeout_s=5)
    finally:
        asyncio.run(second.close())
        asyncio.run(first.close())


def test_an_adopted_engine_that_dies_shows_exited_and_restarts(tmp_path: Path) -> None:
    first = make_backend(tmp_path)
    asyncio.run(first.start("engine-0", 0))
    wait_for(lambda: started_lines(first, "engine-0"))
    pid, _ = pids(started_lines(first, "engine-0")[0])
    second = make_backend(tmp_path)
    try:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: observe(second)[0].phase is Phase.EXITED)
        asyncio.run(second.start("engine-0", 0))
        wait_for(lambda: len(started_lines(second, "engine-0")) == 2)
        [restarted] = observe(second)
        assert restarted.phase is Phase.RUNNING
    finally:
        asyncio.run(second.close())
        asyncio.run(first.close())


def test_a_dead_recorded_engine_is_not_adopted(tmp_path: Path) -> None:
    first = make_backend(tmp_path)
    asyncio.run(first.start("engine-0", 0))
    wait_for(lambda: started_lines(first, "engine-0"))
    pid, _ = pids(started_lines(first, "engine-0")[0])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid))
    try:
        assert observe(make_backend(tmp_path)) == []
    finally:
        asyncio.run(first.close())


def test_an_engine_that_cannot_start_is_reported_with_its_own_message(tmp_path: Path) -> None:
    backend = make_backend(tmp_path, engine=UNSTARTABLE_ENGINE)
    try:
        asyncio.run(backend.start("engine-0", 0))
        wait_for(lambda: observe(backend)[0].phase is Phase.EXITED)
        [instance] = observe(backend)
        assert instance.cannot_start == "architecture Foo is not supported"
    finally:
        asyncio.run(backend.close())


def test_the_reconcile_loop_gives_up_on_an_engine_that_cannot_start(tmp_path: Path) -> None:
    """No restart loop: the loop ends with the engine's message after the first such exit."""

    async def scenario() -> None:
        backend = make_backend(tmp_path, engine=UNSTARTABLE_ENGINE)
        policy = RestartPolicy(backoff_initial_s=0.1, backoff_max_s=0.1)
        reconciler = Reconciler(ReplicaRegistry(6.0, 30.0), backend, 1, policy, interval_s=0.1)
        try:
            with pytest.raises(EngineCannotStart, match="architecture Foo is not supported"):
                await asyncio.wait_for(reconciler.run(), timeout=15)
            assert len(backend.log_path("engine-0").read_text().splitlines()) == 1  # one start
        finally:
            await backend.close()

    asyncio.run(scenario())


def test_a_crash_that_is_not_a_start_failure_is_restarted(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    try:
        asyncio.run(backend.start("engine-0", 0))
        wait_for(lambda: started_lines(backend, "engine-0"))
        pid, _ = pids(started_lines(backend, "engine-0")[0])
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: observe(backend)[0].phase is Phase.EXITED)
        assert observe(backend)[0].cannot_start == ""
    finally:
        asyncio.run(backend.close())


def test_the_desired_size_survives_with_the_adopted_engines(tmp_path: Path) -> None:
    """After ``switchyard scale``, a restarted controller keeps the scaled size rather than
    its ``--engines`` flag, which would stop (or double) the engines it adopts."""
    first = make_backend(tmp_path)
    reconciler = Reconciler(
        ReplicaRegistry(6.0, 30.0), first, 1, RestartPolicy(), on_scale=first.record_desired
    )
    reconciler.scale(2)
    asyncio.run(first.start("engine-0", 0))
    wait_for(lambda: started_lines(first, "engine-0"))
    second = make_backend(tmp_path)
    try:
        assert second.adopted_desired == 2
    finally:
        asyncio.run(second.close())
        asyncio.run(first.close())
    # Nothing ran any more: a fresh stack starts from its own flag.
    assert make_backend(tmp_path).adopted_desired is None
