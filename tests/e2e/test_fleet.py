"""The fleet under ``switchyard up``: a killed engine comes back, ``switchyard scale`` adds a
replica that takes traffic, requests survive losing one of two replicas, and Ctrl-C leaves no
process behind.

The tests share one stack and run in file order, each leaving it as the next expects; the last
one stops it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.stack import (
    API_KEY,
    MODEL_NAME,
    REPO_ROOT,
    Stack,
    engine_pid,
    engine_stats,
    marked_pids,
    ready_replicas,
    start_stack,
    stop_stack,
    wait_until,
)

RECOVERY_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def fleet(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_stack(checkpoint, tmp_path_factory.mktemp("fleet"), engines=1)
    yield started
    stop_stack(started)


def complete(stack: Stack, count: int) -> list[str]:
    """``count`` concurrent completions; returns their texts (raises on any failure)."""

    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        reply = await client.completions.create(
            model=MODEL_NAME, prompt=f"track {i}", max_tokens=8, temperature=0
        )
        return reply.choices[0].text

    async def everyone() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=120
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(count)))

    return asyncio.run(everyone())


def switchyard(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "switchyard", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def test_killed_engine_is_restarted_by_the_controller(fleet: Stack) -> None:
    old_pid = engine_pid(fleet, "engine-0")
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: "engine-0" not in ready_replicas(fleet), 30, "engine-0 to leave")
    wait_until(
        lambda: "engine-0" in ready_replicas(fleet), RECOVERY_TIMEOUT_S, "engine-0 to be back"
    )
    assert engine_pid(fleet, "engine-0") != old_pid
    assert len(complete(fleet, 2)) == 2


def test_scale_up_adds_a_replica_that_takes_traffic(fleet: Stack) -> None:
    assert "engines: 1 -> 2" in switchyard(
        "scale", "engines", "2", "--controller", fleet.controller
    )
    wait_until(lambda: len(ready_replicas(fleet)) == 2, RECOVERY_TIMEOUT_S, "two READY replicas")
    status = switchyard("status", "--controller", fleet.controller)
    assert "engines: 2 desired" in status
    assert status.count("READY") == 2
    [new_address] = [a for r, a in ready_replicas(fleet).items() if r != "engine-0"]
    before = engine_stats(new_address).load.prompt_tokens_total
    complete(fleet, 16)
    assert engine_stats(new_address).load.prompt_tokens_total > before


def test_requests_succeed_when_one_of_two_replicas_dies(fleet: Stack) -> None:
    replicas = ready_replicas(fleet)
    assert len(replicas) == 2
    victim = max(replicas)
    victim_pid = engine_pid(fleet, victim)
    os.kill(victim_pid, signal.SIGKILL)
    texts = complete(fleet, 8)  # at once: the routing table may still name the dead one
    assert len(texts) == 8

    def victim_back() -> bool:
        try:
            restarted = engine_pid(fleet, victim) != victim_pid
        except LookupError:
            return False
        return restarted and len(ready_replicas(fleet)) == 2

    wait_until(victim_back, RECOVERY_TIMEOUT_S, "the victim to be back")


def test_scale_down_stops_the_newest_while_requests_go_on(fleet: Stack) -> None:
    newest = max(ready_replicas(fleet))
    newest_pid = engine_pid(fleet, newest)
    assert "engines: 2 -> 1" in switchyard(
        "scale", "engines", "1", "--controller", fleet.controller
    )
    assert len(complete(fleet, 8)) == 8
    wait_until(lambda: newest_pid not in marked_pids(fleet.mark), 60, f"{newest} to exit")
    assert list(ready_replicas(fleet)) == ["engine-0"]
    assert len(complete(fleet, 2)) == 2


def test_ctrl_c_while_an_engine_starts_leaves_no_process_behind(fleet: Stack) -> None:
    switchyard("scale", "engines", "2", "--controller", fleet.controller)
    wait_until(lambda: len(marked_pids(fleet.mark)) >= 5, 30, "a new engine process")
    assert stop_stack(fleet) == 0  # the new engine is still loading its model
    assert marked_pids(fleet.mark) == []
    assert "Stopped." in fleet.output.read_text()
