"""``kill -9`` of the KV service: requests go on (the engines treat its absence as cache
misses), ``switchyard up`` starts it again on the same address, and nothing is left over."""

from __future__ import annotations

import os
import signal

import grpc

from switchyard.v1 import kv_pb2, kv_pb2_grpc
from tests.chaos.checks import assert_idle, complete
from tests.e2e.stack import Stack, service_pid, wait_until


def kv_answers(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            kv_pb2_grpc.KVServiceStub(channel).Stats(kv_pb2.StatsRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return True


def new_pid(stack: Stack, module: str, old: int) -> bool:
    try:
        return service_pid(stack, module) != old
    except LookupError:
        return False


def test_serving_continues_and_the_kv_service_comes_back(chaos_stack: Stack) -> None:
    assert kv_answers(chaos_stack.kv)
    old = service_pid(chaos_stack, "kv_service")
    os.kill(old, signal.SIGKILL)

    # At once, before any restart: distinct prompts, so that the engines look them up.
    for i in range(4):
        reply = complete(chaos_stack, prompt=f"while the KV service is down {i} " * 8)
        assert reply.status_code == 200, reply.text

    wait_until(lambda: new_pid(chaos_stack, "kv_service", old), 30, "a new KV service")
    wait_until(lambda: kv_answers(chaos_stack.kv), 30, "the KV service to answer")
    assert (
        "the KV service exited (killed by SIGKILL); restarting it" in chaos_stack.output.read_text()
    )
    assert complete(chaos_stack, prompt="after the KV service came back").status_code == 200
    assert_idle(chaos_stack)
