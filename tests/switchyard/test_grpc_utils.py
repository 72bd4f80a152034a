"""The shared gRPC server reports health and maps exceptions to status codes."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchyard.grpc_utils import create_server, insecure_channel, status_code_for


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ValueError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (KeyError("x"), grpc.StatusCode.NOT_FOUND),
        (FileNotFoundError("x"), grpc.StatusCode.NOT_FOUND),
        (PermissionError("x"), grpc.StatusCode.PERMISSION_DENIED),
        (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
        (NotImplementedError(), grpc.StatusCode.UNIMPLEMENTED),
        (ConnectionRefusedError(), grpc.StatusCode.UNAVAILABLE),
        (MemoryError(), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (RuntimeError("bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_exception_status_codes(exc: BaseException, code: grpc.StatusCode) -> None:
    assert status_code_for(exc) == code


def test_health_follows_set_serving_and_stop() -> None:
    async def scenario() -> list[int]:
        server = create_server("127.0.0.1", 0, ["switchyard.v1.EngineService"])
        await server.start()
        seen = []
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def check(service: str) -> int:
                request = health_pb2.HealthCheckRequest(service=service)
                return (await health.Check(request, timeout=5)).status

            seen.append(await check(""))
            await server.set_serving(True)
            seen.append(await check(""))
            seen.append(await check("switchyard.v1.EngineService"))
            await server.set_serving(False)
            seen.append(await check("switchyard.v1.EngineService"))
        await server.stop(None)
        return seen

    status = health_pb2.HealthCheckResponse
    assert asyncio.run(scenario()) == [
        status.NOT_SERVING,
        status.SERVING,
        status.SERVING,
        status.NOT_SERVING,
    ]


_SERVE_SCRIPT = """
import asyncio, sys, time
from switchyard.grpc_utils import serve_until_signalled

async def start():
    print("starting", flush=True)
    await asyncio.sleep(float(sys.argv[1]))
    print("started", flush=True)

async def stop():
    print("stopped", flush=True)

asyncio.run(serve_until_signalled(start, stop))
"""


def _run_and_signal(tmp_path, start_seconds: float, wait_for: str):
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "serve.py"
    script.write_text(_SERVE_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(start_seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    while wait_for not in proc.stdout.readline():
        pass
    signalled_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=20)
    return proc.returncode, rest, time.monotonic() - signalled_at


def test_a_signal_while_starting_ends_the_process_without_waiting_for_start(tmp_path):
    code, rest, seconds = _run_and_signal(tmp_path, 60.0, "starting")
    assert code == 0
    assert "started" not in rest
    assert seconds < 15


def test_a_signal_after_start_runs_stop(tmp_path):
    code, rest, _ = _run_and_signal(tmp_path, 0.0, "started")
    assert code == 0
    assert "stopped" in rest
