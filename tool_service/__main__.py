"""``python -m tool_service``: run the tool service (flags: ``--help``)."""

from __future__ import annotations

import asyncio

from switchyard.log import setup_logging
from switchyard.settings import ToolServiceSettings, load_settings
from tool_service.server import serve


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(ToolServiceSettings, argv, prog="python -m tool_service")
    setup_logging("tools", settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
