"""``kill -9`` of an engine mid-stream. What users see: the stream that was producing tokens
ends within seconds with an error event in the API's format (never a hang, never a silent
cut); the requests that had produced nothing yet are retried after the controller restarts
the engine and complete in full; a new request succeeds. Then the stack is idle again."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx

from tests.chaos.checks import assert_idle, complete, start_stream
from tests.e2e.stack import Stack, engine_pid, engine_stats, ready_replicas, wait_until

ERROR_WITHIN_S = 10.0


def retries(stack: Stack) -> float:
    text = httpx.get(f"{stack.url}/metrics", timeout=10).text
    line = next(
        line
        for line in text.splitlines()
        if line.startswith("switchyard_gateway_engine_retries_total")
    )
    return float(line.split()[-1])


def test_killing_the_engine_mid_stream(chaos_stack: Stack) -> None:
    [address] = ready_replicas(chaos_stack).values()
    retries_before = retries(chaos_stack)
    running = start_stream(chaos_stack, "the running one", 1900)
    assert running.first_chunk.wait(30)
    waiting = [start_stream(chaos_stack, f"waiting {i}", 6) for i in range(2)]
    plain: list[httpx.Response] = []  # and one that does not stream
    plain_thread = threading.Thread(
        target=lambda: plain.append(complete(chaos_stack, prompt="waiting plain", max_tokens=6))
    )
    plain_thread.start()
    wait_until(lambda: engine_stats(address).load.num_waiting == 3, 15, "three waiting requests")

    victim = engine_pid(chaos_stack, "engine-0")
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    assert running.finished.wait(ERROR_WITHIN_S), "the running stream did not end"
    assert running.failure is None
    assert running.status == 200 and running.chunks  # it had streamed ...
    assert running.error is not None  # ... and then says why it stopped, as OpenAI would
    assert set(running.error) >= {"message", "type"}
    assert "127.0.0.1" not in str(running.error["message"])
    assert running.done
    assert time.monotonic() - killed_at < ERROR_WITHIN_S

    for stream in waiting:  # retried after the restart, seen by the client as plain successes
        assert stream.finished.wait(150), "a waiting request hung"
        assert stream.failure is None and stream.error is None, stream.error
        assert stream.done and stream.finish_reason == "length"
    plain_thread.join(150)
    [reply] = plain
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] == "length"
    assert retries(chaos_stack) >= retries_before + 3

    def restarted() -> bool:
        try:
            return engine_pid(chaos_stack, "engine-0") != victim
        except LookupError:
            return False

    wait_until(restarted, 60, "engine-0 restarted")
    wait_until(lambda: "engine-0" in ready_replicas(chaos_stack), 60, "engine-0 READY")
    assert complete(chaos_stack, prompt="after the restart").status_code == 200
    assert_idle(chaos_stack)
