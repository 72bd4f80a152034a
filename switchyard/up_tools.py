"""What ``switchyard up`` adds for the tool service, MCP and rate limits: its flags, the tool
service's command line, and the gateway flags that point at it.

Kept apart from :mod:`switchyard.cli` so that the command's core stays about processes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_TOOL_PORT = 50070


def add_tool_arguments(up: argparse.ArgumentParser) -> None:
    group = up.add_argument_group("tools, MCP and rate limits")
    group.add_argument(
        "--mcp-server",
        action="append",
        default=[],
        metavar="LABEL=URL_OR_COMMAND",
        help="an MCP server whose tools the platform offers under LABEL (repeatable): a "
        "http(s) URL is Streamable HTTP, anything else a command line speaking stdio",
    )
    group.add_argument(
        "--file-search-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory the built-in file_search tool may read (repeatable)",
    )
    group.add_argument(
        "--allow-outbound-mcp",
        action="store_true",
        help="let /v1/responses reach MCP servers by server_url",
    )
    group.add_argument(
        "--tool-port",
        type=int,
        help=f"tool service gRPC port (default: {DEFAULT_TOOL_PORT} if free)",
    )
    group.add_argument("--rate-limit-rpm", type=int, help="default requests per minute per key")
    group.add_argument("--rate-limit-tpm", type=int, help="default tokens per minute per key")
    group.add_argument(
        "--redis-url", help="redis://HOST:PORT shared by gateways for limits and responses"
    )
    group.add_argument(
        "--admin-key", help="bearer key of the admin API (/admin/keys, LoRA load/unload)"
    )


def tool_service_argv(args: argparse.Namespace, data_dir: Path, port: int) -> list[str]:
    argv = [
        sys.executable, "-m", "tool_service",
        "--data-dir", str(data_dir),
        "--log-level", args.log_level,
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    if args.mcp_server:
        argv += ["--mcp-servers", json.dumps(args.mcp_server)]
    if args.file_search_root:
        roots = [str(Path(root).expanduser().resolve()) for root in args.file_search_root]
        argv += ["--file-search-roots", ",".join(roots)]
    if args.allow_outbound_mcp:
        argv.append("--allow-outbound-mcp")
    return argv


def gateway_tool_args(args: argparse.Namespace, tool_address: str) -> list[str]:
    argv = ["--tool-service-address", tool_address]
    if args.allow_outbound_mcp:
        argv.append("--allow-outbound-mcp")
    for flag, value in (
        ("--rate-limit-rpm", args.rate_limit_rpm),
        ("--rate-limit-tpm", args.rate_limit_tpm),
        ("--redis-url", args.redis_url),
        ("--admin-key", args.admin_key),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return argv
