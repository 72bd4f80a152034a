"""An external MCP server for the tests, written with the official ``mcp`` SDK.

``python weather_mcp_server.py`` serves on stdio; ``python weather_mcp_server.py http PORT``
serves Streamable HTTP at ``http://127.0.0.1:PORT/mcp``. Its tools: ``forecast`` (a fixed
answer computed from the city's name, so tests can check it came from here), ``slow`` (sleeps,
reporting progress) and ``explode`` (raises).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

server = MCPServer("weather")


@server.tool()
def forecast(city: Annotated[str, Field(min_length=1, max_length=12)]) -> str:
    """The forecast for a city."""
    return f"forecast for {city}: {len(city)} degrees and sunny"


# A closed schema, so that a model forced to call the tool writes `city` and stops there.
server._tool_manager.get_tool("forecast").parameters["additionalProperties"] = False


@server.tool()
async def slow(seconds: float, ctx: Context) -> str:
    """Sleeps for a while, reporting progress."""
    steps = 4
    for step in range(steps):
        await ctx.report_progress(step, steps, f"step {step}")
        await asyncio.sleep(seconds / steps)
    return "done"


@server.tool()
def explode() -> str:
    """Always fails."""
    raise RuntimeError("the weather station is on fire")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "http":
        import uvicorn

        app = server.streamable_http_app(host="127.0.0.1")
        uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
    else:
        server.run("stdio")
