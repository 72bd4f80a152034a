"""``kill -9`` of the gateway: clients lose their connection (nothing else can happen to
them), ``switchyard up`` starts a new gateway on the same address, and the engine, which the
killed gateway's streams were using, frees their work."""

from __future__ import annotations

import os
import signal

import httpx

from tests.chaos.checks import assert_idle, complete, start_stream
from tests.e2e.stack import Stack, service_pid, wait_until


def gateway_back(stack: Stack, old: int) -> bool:
    try:
        if service_pid(stack, "gateway") == old:
            return False
        return httpx.get(f"{stack.url}/health", timeout=2).status_code == 200
    except (LookupError, httpx.HTTPError):
        return False


def test_the_gateway_comes_back_on_the_same_address(chaos_stack: Stack) -> None:
    stream = start_stream(chaos_stack, "a stream through the doomed gateway", 1900)
    assert stream.first_chunk.wait(30)
    old = service_pid(chaos_stack, "gateway")
    os.kill(old, signal.SIGKILL)

    assert stream.finished.wait(10)
    assert not stream.done  # cut off: the client sees its connection drop, not a hang
    wait_until(lambda: gateway_back(chaos_stack, old), 60, "a new gateway serving")
    assert "the gateway exited (killed by SIGKILL); restarting it" in (
        chaos_stack.output.read_text()
    )
    assert complete(chaos_stack, prompt="through the new gateway").status_code == 200
    assert_idle(chaos_stack)  # the engine aborted what the dead gateway had asked for
