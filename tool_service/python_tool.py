"""The built-in ``python`` tool: runs a script in a sandboxed subprocess and returns its
stdout and stderr, as gpt-oss's ``python`` tool does (stateless: each call is a new process).

Input ``{"code": string}``. The script runs with ``python -I`` in a fresh scratch directory
(its working directory, removed afterwards) under these limits, each enforced by the kernel
or by the process that watches it:

- CPU time (``RLIMIT_CPU``), address space (``RLIMIT_AS``), size of any file it writes
  (``RLIMIT_FSIZE``), open files (``RLIMIT_NOFILE``);
- wall-clock time: the process group is killed when it is over;
- output: stdout and stderr are read up to ``output_bytes`` each; past that the process is
  killed and the output marked truncated.

Isolation, in two layers:

1. The child enters a new user and network namespace before it runs anything (``unshare``),
   so it has no network interface but loopback; where the kernel refuses user namespaces
   the service logs it once and relies on the second layer.
2. A Python audit hook, installed before the script is compiled and impossible to remove
   from Python code, refuses sockets, starting processes (``subprocess``, ``os.system``,
   ``os.exec*``, ``os.fork``), loading native code (``ctypes``, ``cffi``), and any write,
   rename, delete, chmod or link outside the scratch directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from switchyard.v1 import tool_pb2
from tool_service.tools import BUILTIN_LABEL, ProgressFn, Tool, ToolOutput, require_string

logger = logging.getLogger(__name__)

READ_CHUNK = 8192

# Runs in the child before the script: the audit hook, then the script itself. Kept free
# of anything the hook refuses.
_BOOTSTRAP = r"""
import os, sys, resource
def _confine():
    if os.environ.pop("SANDBOX_ISOLATE", "0") == "1":
        import ctypes
        if ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000) != 0:
            os._exit(70)  # isolation was expected and is not there: do not run the script
    for name, value in (("CPU", int(os.environ.pop("SANDBOX_CPU_S"))),
                        ("AS", int(os.environ.pop("SANDBOX_MEMORY"))),
                        ("FSIZE", int(os.environ.pop("SANDBOX_FILE_BYTES"))),
                        ("NOFILE", int(os.environ.pop("SANDBOX_OPEN_FILES"))),
                        ("CORE", 0)):
        limit = getattr(resource, "RLIMIT_" + name)
        hard = value + 1 if name == "CPU" else value
        resource.setrlimit(limit, (value, hard))
_confine()
del _confine
for _name in [n for n in sys.modules if n.split(".")[0] in ("ctypes", "_ctypes")]:
    del sys.modules[_name]  # so that the script's own import of ctypes meets the hook
_SCRATCH = os.path.realpath(os.getcwd())
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_PATH_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
    "os.chmod": (0,), "os.chown": (0,), "os.symlink": (0, 1), "os.link": (0, 1),
    "os.truncate": (0,), "os.utime": (0,), "os.chflags": (0,), "os.lchown": (0,),
    "os.mkfifo": (0,), "os.mknod": (0,), "os.chdir": (0,), "shutil.rmtree": (0,),
}
_REFUSED = {
    "subprocess.Popen": "starting processes", "os.system": "starting processes",
    "os.exec": "starting processes", "os.posix_spawn": "starting processes",
    "os.spawn": "starting processes", "os.fork": "starting processes",
    "os.forkpty": "starting processes", "pty.spawn": "starting processes",
    "os.startfile": "starting processes", "os.kill": "signalling processes",
    "os.killpg": "signalling processes", "ctypes.dlopen": "loading native code",
    "ctypes.dlsym": "loading native code", "ctypes.cdata": "loading native code",
    "sys.setprofile": "tracing", "sys.settrace": "tracing",
    "object.__setattr__": None,
}
_NATIVE = {"ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess", "mmap"}

def _inside(path):
    if isinstance(path, int):
        return True
    real = os.path.realpath(os.fsdecode(path))
    return real == _SCRATCH or real.startswith(_SCRATCH + os.sep)

def _audit(event, args):
    if event == "open":
        path, mode, flags = args
        writing = bool(mode and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE)
        if writing and path is not None and not _inside(path):
            raise PermissionError(f"writing outside the scratch directory is not allowed: {path}")
    elif event in _PATH_EVENTS:
        for position in _PATH_EVENTS[event]:
            if position < len(args) and args[position] is not None and not _inside(args[position]):
                raise PermissionError(f"{event} outside the scratch directory is not allowed")
    elif event.startswith("socket."):
        raise PermissionError("network access is disabled in this sandbox")
    elif event == "import" and args[0].split(".")[0] in _NATIVE:
        raise PermissionError(f"importing {args[0]} is not allowed in this sandbox")
    elif event in _REFUSED:
        if event == "object.__setattr__":
            if args[1] in ("__code__", "__globals__", "__closure__"):
                raise PermissionError("rewriting code objects is not allowed in this sandbox")
            return
        raise PermissionError(f"{_REFUSED[event]} is not allowed in this sandbox")

sys.addaudithook(_audit)
del _audit
_code = sys.stdin.read()
sys.stdin.close()
exec(compile(_code, "<python>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass(frozen=True, slots=True)
class PythonLimits:
    cpu_s: int = 10
    wall_s: float = 30.0
    memory_bytes: int = 1 << 30
    output_bytes: int = 64 << 10
    file_bytes: int = 16 << 20
    open_files: int = 64


@dataclass(slots=True)
class RunResult:
    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    truncated: bool
    isolated_network: bool
    duration_s: float


_user_namespaces_ok: bool | None = None
_PROBE = (
    "import ctypes, os; "
    "os._exit(0 if ctypes.CDLL(None).unshare(0x10000000 | 0x40000000) == 0 else 1)"
)


async def _can_unshare() -> bool:
    """Whether this kernel lets an unprivileged process make a user + network namespace
    (checked once, in a throwaway child)."""
    global _user_namespaces_ok
    if _user_namespaces_ok is None:
        probe = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-c", _PROBE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        _user_namespaces_ok = await probe.wait() == 0
        if not _user_namespaces_ok:
            logger.warning(
                "user namespaces are not available: the python tool's network isolation "
                "relies on its audit hook alone"
            )
    return _user_namespaces_ok


async def run_python(
    code: str, limits: PythonLimits, scratch_root: Path | None = None
) -> RunResult:
    """Runs ``code`` in a sandboxed child (see the module docstring) and collects its output."""
    isolate = await _can_unshare()
    scratch = Path(tempfile.mkdtemp(prefix="python-tool-", dir=scratch_root))
    started = time.monotonic()
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(scratch),
        "TMPDIR": str(scratch),
        "LANG": "C.UTF-8",
        "SANDBOX_ISOLATE": "1" if isolate else "0",
        "SANDBOX_CPU_S": str(limits.cpu_s),
        "SANDBOX_MEMORY": str(limits.memory_bytes),
        "SANDBOX_FILE_BYTES": str(limits.file_bytes),
        "SANDBOX_OPEN_FILES": str(limits.open_files),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-c", _BOOTSTRAP,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=scratch,
        env=env,
        start_new_session=True,
    )  # fmt: skip
    truncated = False

    async def read_capped(stream: asyncio.StreamReader) -> bytes:
        nonlocal truncated
        data = bytearray()
        while chunk := await stream.read(READ_CHUNK):
            room = limits.output_bytes - len(data)
            data += chunk[:room]
            if len(chunk) > room:
                truncated = True
                _kill_group(process.pid)
                break
        return bytes(data)

    timed_out = False
    try:
        assert process.stdin is not None and process.stdout is not None
        assert process.stderr is not None
        process.stdin.write(code.encode())
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await process.stdin.drain()
        process.stdin.close()
        reading = asyncio.gather(read_capped(process.stdout), read_capped(process.stderr))
        try:
            stdout, stderr = await asyncio.wait_for(reading, limits.wall_s)
        except TimeoutError:
            timed_out = True
            _kill_group(process.pid)
            stdout, stderr = b"", b""
        await process.wait()
    finally:
        if process.returncode is None:
            _kill_group(process.pid)
            await process.wait()
        _kill_group(process.pid)  # anything the script left in its group
        shutil.rmtree(scratch, ignore_errors=True)
    code_ = process.returncode
    if code_ == 70 and isolate and not stdout and not stderr:
        raise RuntimeError("the sandbox could not isolate the python process")
    return RunResult(
        stdout=stdout.decode(errors="replace"),
        stderr=stderr.decode(errors="replace"),
        exit_code=code_,
        timed_out=timed_out,
        truncated=truncated,
        isolated_network=isolate,
        duration_s=time.monotonic() - started,
    )


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _describe_exit(result: RunResult, limits: PythonLimits) -> str:
    if result.timed_out:
        return f"[killed: over the wall-clock limit of {limits.wall_s:g} s]"
    if result.truncated:
        return f"[killed: output over the limit of {limits.output_bytes} bytes]"
    code = result.exit_code
    if code is not None and code < 0:
        if -code == signal.SIGXCPU:
            return f"[killed: over the CPU-time limit of {limits.cpu_s} s]"
        return f"[killed by {signal.Signals(-code).name}]"
    return ""


class PythonTool(Tool):
    """The ``python`` tool; each call runs :func:`run_python` with the configured limits."""

    def __init__(self, limits: PythonLimits, scratch_root: Path | None = None) -> None:
        self.limits = limits
        self.scratch_root = scratch_root
        self.info = tool_pb2.ToolInfo(
            name="python",
            server_label=BUILTIN_LABEL,
            server_tool_name="python",
            description=(
                "Runs a Python 3 script and returns what it prints (stdout, then stderr). "
                "Each call is a fresh process with no network, a scratch working directory "
                f"and limits: {limits.cpu_s} s CPU, {limits.wall_s:g} s wall clock, "
                f"{limits.memory_bytes >> 20} MiB memory, {limits.output_bytes >> 10} KiB "
                "output. Print the values you want to see."
            ),
            input_schema_json=(
                '{"type": "object", "properties": {"code": {"type": "string", '
                '"description": "the Python script to run"}}, "required": ["code"], '
                '"additionalProperties": false}'
            ),
        )

    async def call(self, arguments: dict[str, Any], progress: ProgressFn) -> ToolOutput:
        code = require_string(arguments, "code")
        result = await run_python(code, self.limits, self.scratch_root)
        note = _describe_exit(result, self.limits)
        parts = [result.stdout]
        if result.stderr:
            parts.append(result.stderr)
        if note:
            parts.append(note)
        text = "\n".join(part.rstrip("\n") for part in parts if part) or "(no output)"
        failed = bool(note) or result.exit_code != 0
        return ToolOutput.text(
            text,
            is_error=failed,
            structured={
                "stdout": result.stdout,
                "stderr": result.stderr,
                "exit_code": result.exit_code,
                "timed_out": result.timed_out,
                "truncated": result.truncated,
            },
        )
