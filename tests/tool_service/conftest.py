"""Fixtures of the tool-service tests: the weather MCP server over Streamable HTTP, and the
tool service itself on a background loop."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from switchyard.settings import ToolServiceSettings
from tests.support import BackgroundLoop
from tool_service.server import ToolServer

WEATHER_SERVER = Path(__file__).with_name("weather_mcp_server.py")
WEATHER_STDIO = f"{sys.executable} {WEATHER_SERVER}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_weather_http() -> tuple[str, subprocess.Popen[bytes]]:
    """The weather server on Streamable HTTP, once it answers: (its URL, its process)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(WEATHER_SERVER), "http", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url, timeout=1)
            return url, process
        except httpx.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("the weather MCP server did not start") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def weather_http() -> Iterator[str]:
    """The weather server on Streamable HTTP; yields its URL."""
    url, process = start_weather_http()
    yield url
    process.terminate()
    process.wait(timeout=10)


StartTools = Callable[..., ToolServer]


@pytest.fixture
def start_tools() -> Iterator[StartTools]:
    """``start_tools(**settings) -> ToolServer`` on a free port; stopped after the test."""
    background = BackgroundLoop()
    servers: list[ToolServer] = []

    def start(**overrides: object) -> ToolServer:
        values: dict[str, object] = {"host": "127.0.0.1", "port": 0, "python_wall_s": 10.0}
        values.update(overrides)
        server = ToolServer(ToolServiceSettings(**values))
        background.run(server.start())
        servers.append(server)
        return server

    yield start
    for server in servers:
        background.run(server.stop(0.5))
    background.close()
