"""``switchyard up --tensor-parallel-size 2`` on the CPU (gloo): one engine of two ranks is
one replica to the controller, the gateway and ``switchyard status``, and answers through
the gateway (its tokens equal one rank's: tests/engine_service/test_tensor_parallel.py); a
killed rank takes its replica down and the controller
restarts it; Ctrl-C stops every process of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.chaos.checks import complete
from tests.e2e.stack import (
    REPO_ROOT,
    Stack,
    engine_pid,
    engine_stats,
    list_replicas,
    marked_pids,
    ready_replicas,
    start_stack,
    stop_stack,
    wait_until,
)

WORKER_MODULE = b"engine_service.engine.parallel.worker"


def worker_pids(stack: Stack) -> list[int]:
    """The stack's processes running a rank other than 0."""
    found = []
    for pid in marked_pids(stack.mark):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if WORKER_MODULE in argv:
            found.append(pid)
    return found


def status(stack: Stack) -> str:
    return subprocess.run(
        [sys.executable, "-m", "switchyard", "status", "--controller", stack.controller],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def test_a_two_rank_engine_is_one_replica_that_restarts_whole(checkpoint: Path, tmp_path: Path):
    stack = start_stack(checkpoint, tmp_path, engines=1, extra_args=["-tp", "2"])
    try:
        assert list(ready_replicas(stack)) == ["engine-0"]
        shown = status(stack)
        assert shown.count("READY") == 1 and "engine-0" in shown
        [worker] = worker_pids(stack)

        reply = complete(stack, prompt="Hello there", max_tokens=8)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 8

        rank0 = engine_pid(stack, "engine-0")
        os.kill(worker, signal.SIGKILL)

        def restarted() -> bool:
            try:
                return engine_pid(stack, "engine-0") != rank0 and len(worker_pids(stack)) == 1
            except LookupError:
                return False

        wait_until(restarted, 120, "engine-0 restarted with its two ranks")
        wait_until(lambda: "engine-0" in ready_replicas(stack), 120, "engine-0 READY again")
        [log_file] = stack.data_dir.glob("stacks/*/logs/engine-0.log")
        log = log_file.read_text()
        assert "engine rank 1 exited" in log
        assert complete(stack, prompt="after the restart").status_code == 200
    finally:
        code = stop_stack(stack)
    deadline = time.monotonic() + 10
    while marked_pids(stack.mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert code == 0, stack.output.read_text()
    assert marked_pids(stack.mark) == []


def test_a_data_parallel_engine_is_one_replica_whose_capacity_is_its_ranks_together(
    checkpoint: Path, tmp_path: Path
):
    """``switchyard up -dp 2``: two ranks, each with its own batch and KV pool, are one
    replica; the controller sees their slots and KV blocks added up, and requests spread
    over both ranks come back through the gateway."""
    stack = start_stack(
        checkpoint, tmp_path, engines=1, extra_args=["-dp", "2", "--max-num-seqs", "8"]
    )
    try:
        assert list(ready_replicas(stack)) == ["engine-0"]
        assert status(stack).count("READY") == 1
        assert len(worker_pids(stack)) == 1
        [replica] = list_replicas(stack).replicas
        assert replica.load.max_num_seqs == 16  # 8 per data-parallel rank
        single_rank_blocks = engine_stats(replica.address).num_blocks_total // 2
        assert single_rank_blocks > 0
        with ThreadPoolExecutor(3) as pool:
            replies = list(
                pool.map(lambda i: complete(stack, prompt=f"request {i}", max_tokens=6), range(3))
            )
        for reply in replies:
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == 6
    finally:
        code = stop_stack(stack)
    assert code == 0, stack.output.read_text()
