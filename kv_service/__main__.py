"""``python -m kv_service``: run the KV service (flags: ``--help``)."""

from __future__ import annotations

import asyncio

from kv_service.server import serve
from switchyard.log import setup_logging
from switchyard.settings import KVServiceSettings, load_settings


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(KVServiceSettings, argv, prog="python -m kv_service")
    setup_logging("kv", settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
