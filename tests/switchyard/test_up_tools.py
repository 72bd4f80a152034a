"""``switchyard up``'s tool, MCP and rate-limit flags reach the tool service and the gateway,
and the tool service's settings read MCP servers from flags, env and YAML alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from switchyard.cli import build_parser
from switchyard.settings import GatewaySettings, ToolServiceSettings, load_settings
from switchyard.up_tools import gateway_tool_args, tool_service_argv

COMMAND = "python -m my_server --flag a,b"


def test_mcp_servers_and_roots_reach_the_tool_service(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["up", "--mcp-server", f"local={COMMAND}", "--mcp-server", "web=http://h:1/mcp",
         "--file-search-root", str(tmp_path), "--allow-outbound-mcp"]
    )  # fmt: skip
    argv = tool_service_argv(args, tmp_path, 50999)
    assert argv[1:3] == ["-m", "tool_service"]
    settings = load_settings(ToolServiceSettings, argv[3:])
    assert settings.mcp_servers == [f"local={COMMAND}", "web=http://h:1/mcp"]
    assert settings.file_search_roots == [tmp_path.resolve()]
    assert settings.allow_outbound_mcp
    assert settings.port == 50999


def test_rate_limits_and_the_tool_service_reach_the_gateway() -> None:
    args = build_parser().parse_args(
        ["up", "--rate-limit-rpm", "60", "--rate-limit-tpm", "5000", "--admin-key", "adm"]
    )
    settings = load_settings(GatewaySettings, gateway_tool_args(args, "127.0.0.1:50070"))
    assert settings.tool_service_address == "127.0.0.1:50070"
    assert (settings.rate_limit_rpm, settings.rate_limit_tpm) == (60, 5000)
    assert settings.admin_key == "adm"
    assert not settings.allow_outbound_mcp


def test_mcp_servers_from_yaml_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "switchyard.yaml"
    config.write_text(f"tools:\n  mcp_servers:\n    - 'local={COMMAND}'\n")
    assert load_settings(ToolServiceSettings, ["--config", str(config)]).mcp_servers == [
        f"local={COMMAND}"
    ]
    monkeypatch.setenv("SWITCHYARD_MCP_SERVERS", "a=http://x/mcp\nb=run-b --x")
    assert ToolServiceSettings().mcp_servers == ["a=http://x/mcp", "b=run-b --x"]


@pytest.mark.parametrize("entry", ["no-equals-sign", "=cmd", "label="])
def test_malformed_mcp_servers_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="LABEL=URL_OR_COMMAND"):
        ToolServiceSettings(mcp_servers=[entry])


def test_duplicate_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        ToolServiceSettings(mcp_servers=["a=x", "a=y"])
