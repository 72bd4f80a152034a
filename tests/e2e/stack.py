"""Starting and inspecting a whole stack (``switchyard up`` as a subprocess) for the e2e tests.

Every process of a stack carries ``SWITCHYARD_E2E_STACK=<id>`` in its environment (``up``
passes its environment down to the controller, the gateway and the engines), which is how the
tests find engine processes to kill and check that nothing outlives a stack.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from switchyard.v1 import (
    common_pb2,
    controller_pb2,
    controller_pb2_grpc,
    engine_pb2,
    engine_pb2_grpc,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MARK_ENV = "SWITCHYARD_E2E_STACK"
API_KEY = "e2e-secret"
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 512
STARTUP_TIMEOUT_S = 240.0


@dataclass(slots=True)
class Stack:
    url: str
    controller: str
    kv: str
    process: subprocess.Popen[bytes]
    output: Path
    data_dir: Path
    mark: str

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def start_stack(
    checkpoint: Path | None,
    work_dir: Path,
    engines: int,
    extra_args: Sequence[str] = (),
    *,
    port: int | None = None,
    data_dir: Path | None = None,
    explicit_ports: bool = True,
    output_name: str = "up.out",
) -> Stack:
    """``switchyard up`` on ``checkpoint`` (None: the demo model); returns once it serves.
    The gateway gets ``port`` (default: a free one); the internal ports are free ones given by
    flag, or with ``explicit_ports=False`` left to ``up`` (their defaults, or free ports when
    taken)."""
    port = port or free_port()
    controller_port, kv_port = free_port(), free_port()
    data_dir = data_dir or work_dir / "data"
    output = work_dir / output_name
    mark = uuid.uuid4().hex
    internal_ports = [
        "--controller-port", str(controller_port),
        "--kv-port", str(kv_port),
        "--kv-metrics-port", str(free_port()),
        "--engine-base-port", str(free_port()),
        "--engine-base-metrics-port", str(free_port()),
        "--tool-port", str(free_port()),
    ]  # fmt: skip
    argv = [
        sys.executable, "-m", "switchyard", "up",
        *(["--model", str(checkpoint)] if checkpoint is not None else []),
        "--served-model-name", MODEL_NAME,
        "--port", str(port),
        *(internal_ports if explicit_ports else []),
        "--engines", str(engines),
        "--api-key", API_KEY,
        "--data-dir", str(data_dir),
        "--device", "cpu",
        "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN),
        "--num-kv-blocks", "512",
        *extra_args,
    ]  # fmt: skip
    env = {**os.environ, MARK_ENV: mark, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with output.open("wb") as out:
        process = subprocess.Popen(
            argv, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env
        )
    stack = Stack(
        url=f"http://127.0.0.1:{port}",
        controller=f"127.0.0.1:{controller_port}",
        kv=f"127.0.0.1:{kv_port}",
        process=process,
        output=output,
        data_dir=data_dir,
        mark=mark,
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while "Switchyard is serving" not in output.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_stack(stack)
            raise RuntimeError(f"switchyard up did not come up:\n{output.read_text()}")
        time.sleep(0.2)
    if not explicit_ports:  # learn the addresses up chose from what it printed
        match = re.search(r"the controller \((\S+)\), the KV service \((\S+)\)", output.read_text())
        assert match is not None, output.read_text()
        stack.controller, stack.kv = match.group(1), match.group(2)
    return stack


def marked_pids(mark: str) -> list[int]:
    """Live (non-zombie) processes of the stack marked ``mark``."""
    needle = f"{MARK_ENV}={mark}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(") ", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


def service_pid(stack: Stack, module: str) -> int:
    """The pid of the stack's process running ``python -m module`` (``controller``,
    ``kv_service``, ``gateway``)."""
    for pid in marked_pids(stack.mark):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:3] == [b"-m", module.encode()]:
            return pid
    raise LookupError(f"no {module} process")


def engine_pid(stack: Stack, replica_id: str) -> int:
    """The pid of the engine process serving ``replica_id``."""
    for pid in marked_pids(stack.mark):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"engine_service" in argv and replica_id.encode() in argv:
            return pid
    raise LookupError(f"no engine process for {replica_id}")


def stop_stack(stack: Stack, timeout_s: float = 60.0) -> int | None:
    """SIGINT to ``up`` (as Ctrl-C would); returns its exit code, None if it had to be
    killed. Kills whatever of the stack is left either way."""
    code: int | None
    if stack.process.poll() is None:
        stack.process.send_signal(signal.SIGINT)
    try:
        code = stack.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stack.process.kill()
        stack.process.wait()
        code = None
    for pid in marked_pids(stack.mark):
        os.kill(pid, signal.SIGKILL)
    return code


def list_replicas(stack: Stack) -> controller_pb2.ListReplicasResponse:
    with grpc.insecure_channel(stack.controller) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        return stub.ListReplicas(controller_pb2.ListReplicasRequest(), timeout=10)


def ready_replicas(stack: Stack) -> dict[str, str]:
    """replica id -> address of the READY replicas."""
    return {
        r.replica_id: r.address
        for r in list_replicas(stack).replicas
        if r.state == common_pb2.REPLICA_STATE_READY
    }


def engine_stats(address: str) -> engine_pb2.GetStatsResponse:
    with grpc.insecure_channel(address) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        return stub.GetStats(engine_pb2.GetStatsRequest(), timeout=10)
