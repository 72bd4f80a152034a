"""The python tool's sandbox: each test tries one way out and checks it is closed."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from tool_service.python_tool import PythonLimits, PythonTool, run_python

LIMITS = PythonLimits(cpu_s=2, wall_s=4.0, memory_bytes=256 << 20, output_bytes=2000)


def run(code: str, limits: PythonLimits = LIMITS):
    return asyncio.run(run_python(code, limits))


def test_prints_come_back_and_the_scratch_directory_is_writable() -> None:
    result = run("open('notes.txt', 'w').write('kept')\nprint(open('notes.txt').read(), 6 * 7)")
    assert result.exit_code == 0
    assert result.stdout == "kept 42\n"


def test_cannot_reach_the_network() -> None:
    # A listener on this machine's loopback: reachable to anything not sandboxed.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    try:
        result = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
    finally:
        listener.close()
    assert result.exit_code != 0
    assert "network access is disabled" in result.stderr
    assert not accepted


def test_the_network_namespace_has_no_route_out() -> None:
    """Below the audit hook: the process's own interfaces (only loopback, down)."""
    result = run("print(open('/proc/net/dev').read())")
    assert result.exit_code == 0
    interfaces = [line.split(":")[0].strip() for line in result.stdout.splitlines()[2:] if line]
    if result.isolated_network:
        assert interfaces == ["lo"]


@pytest.mark.parametrize(
    "code",
    [
        "open({target!r}, 'w').write('x')",
        "import os\nos.rename('a', {target!r})",
        "import pathlib\npathlib.Path({target!r}).write_text('x')",
        "import os\nos.open({target!r}, os.O_WRONLY | os.O_CREAT)",
        "import shutil\nopen('a', 'w').close()\nshutil.copy('a', {target!r})",
    ],
)
def test_cannot_write_outside_its_directory(code: str, tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    if "rename" in code:
        code = "open('a', 'w').close()\n" + code
    result = run(code.format(target=str(target)))
    assert result.exit_code != 0
    assert "not allowed" in result.stderr
    assert not target.exists()


def test_cannot_delete_outside_its_directory(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    result = run(f"import os\nos.remove({str(victim)!r})")
    assert result.exit_code != 0
    assert victim.read_text() == "still here"


@pytest.mark.parametrize(
    "code",
    [
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.system('true')",
        "import os\nos.fork()",
        "import ctypes",
    ],
)
def test_cannot_start_processes_or_load_native_code(code: str) -> None:
    result = run(code)
    assert result.exit_code != 0
    assert "not allowed in this sandbox" in result.stderr


def test_cannot_outlive_its_cpu_limit() -> None:
    # A generous wall clock, so that it is the CPU limit (SIGXCPU) that ends the loop.
    result = run("while True:\n    pass", replace(LIMITS, cpu_s=1, wall_s=60.0))
    assert not result.timed_out
    assert result.exit_code == -signal.SIGXCPU


def test_cannot_outlive_its_wall_clock_limit() -> None:
    result = run("import time\ntime.sleep(60)")
    assert result.timed_out
    assert result.duration_s < LIMITS.wall_s + 2


def test_cannot_take_more_memory_than_its_limit() -> None:
    result = run("blob = bytearray(512 << 20)\nprint('allocated')")
    assert "MemoryError" in result.stderr
    assert "allocated" not in result.stdout


def test_output_is_cut_at_its_limit() -> None:
    result = run("while True:\n    print('x' * 100)")
    assert result.truncated
    assert len(result.stdout) <= LIMITS.output_bytes


def test_the_scratch_directory_is_removed_afterwards() -> None:
    result = run("import os\nprint(os.getcwd())")
    assert not Path(result.stdout.strip()).exists()


def test_the_tool_reports_a_failing_script_as_an_error_with_its_traceback() -> None:
    tool = PythonTool(LIMITS)

    async def no_progress(done: float, total: float, message: str) -> None:
        pass

    output = asyncio.run(tool.call({"code": "print('before')\n1 / 0"}, no_progress))
    assert output.is_error
    text = output.content[0].text
    assert text.startswith("before\n")
    assert "ZeroDivisionError" in text
    assert output.structured["exit_code"] == 1
