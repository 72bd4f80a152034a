"""``python -m engine_service``: run one engine replica (flags: ``--help``)."""

from __future__ import annotations

import asyncio

from engine_service.server import serve
from switchyard.log import setup_logging
from switchyard.settings import EngineSettings, load_settings


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(EngineSettings, argv, prog="python -m engine_service")
    setup_logging("engine", settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
