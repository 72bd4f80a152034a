"""``python -m engine_service``: run one engine replica (flags: ``--help``).

A start that cannot succeed on a retry (a bad flag or setting, an unsupported model
architecture, missing or unreadable model files) logs ``engine cannot start: <reason>`` and
exits with :data:`switchyard.exit_codes.CANNOT_START`, so that a supervisor stops instead of
restarting it in a loop. Any other failure exits with status 1 and is worth a restart.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from engine_service.server import serve
from switchyard.exit_codes import CANNOT_START
from switchyard.log import setup_logging
from switchyard.settings import EngineSettings, load_settings

# What a misconfigured start raises: settings and checkpoints that do not fit (ValueError,
# KeyError, NotImplementedError) and files that are missing or unreadable. Out of memory and
# other runtime errors are not among them: they may pass.
_CONFIG_ERRORS = (
    ValueError,
    LookupError,
    NotImplementedError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def main(argv: list[str] | None = None) -> None:
    try:
        settings = load_settings(EngineSettings, argv, prog="python -m engine_service")
    except SystemExit as exc:
        # argparse has printed the usage and the bad flag or value already.
        raise SystemExit(CANNOT_START if exc.code == 2 else exc.code) from None
    setup_logging("engine", settings.log_level)
    try:
        asyncio.run(serve(settings))
    except _CONFIG_ERRORS as exc:
        logging.getLogger("engine_service").error(
            "engine cannot start: %s", exc, extra={"error": type(exc).__name__}
        )
        sys.exit(CANNOT_START)


if __name__ == "__main__":
    main()
