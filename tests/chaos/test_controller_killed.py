"""``kill -9`` of the controller: the gateway keeps routing on its last table and the engine
keeps serving; ``switchyard up`` starts the controller again, which adopts the running engine
(no second engine process) and gets the routing table back from its re-registration."""

from __future__ import annotations

import os
import signal
import time

from tests.chaos.checks import assert_idle, complete, start_stream
from tests.e2e.stack import (
    Stack,
    engine_pid,
    list_replicas,
    ready_replicas,
    service_pid,
)


def controller_back(stack: Stack, old: int) -> bool:
    try:
        return service_pid(stack, "controller") != old and "engine-0" in ready_replicas(stack)
    except Exception:  # not up yet: no process, or not answering
        return False


def test_serving_continues_and_the_controller_comes_back_with_the_same_engine(
    chaos_stack: Stack,
) -> None:
    engine_before = engine_pid(chaos_stack, "engine-0")
    stream = start_stream(chaos_stack, "a stream across the controller's death", 300)
    assert stream.first_chunk.wait(30)
    old = service_pid(chaos_stack, "controller")
    os.kill(old, signal.SIGKILL)

    # While it is away, while it restarts and after: every request is served.
    served = 0
    back_at: float | None = None
    while back_at is None or time.monotonic() < back_at + 5:
        reply = complete(chaos_stack, prompt=f"no controller {served}")
        assert reply.status_code == 200, reply.text
        served += 1
        if back_at is None and controller_back(chaos_stack, old):
            back_at = time.monotonic()
        assert served < 2000, "the controller did not come back"
    assert stream.finished.wait(60)
    assert stream.failure is None and stream.error is None and stream.done
    assert stream.finish_reason == "length"  # all 300 tokens

    # The engine was adopted, not replaced: same process, and it is the only one.
    assert engine_pid(chaos_stack, "engine-0") == engine_before
    assert [r.replica_id for r in list_replicas(chaos_stack).replicas] == ["engine-0"]
    assert "the controller exited (killed by SIGKILL); restarting it" in (
        chaos_stack.output.read_text()
    )
    assert complete(chaos_stack, prompt="controller is back").status_code == 200
    assert_idle(chaos_stack)
