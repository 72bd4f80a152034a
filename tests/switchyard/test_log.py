"""Log lines are JSON objects carrying the service and the current request id."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from switchyard.log import request_id_var, setup_logging


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_lines_are_json_with_request_id_and_extras(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("engine", "debug")
    logger = logging.getLogger("switchyard.test")

    logger.info("no request yet")
    token = request_id_var.set("req-1")
    try:
        logger.warning("tokens %d", 5, extra={"num_tokens": 5})
    finally:
        request_id_var.reset(token)

    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["msg"] == "no request yet"
    assert "request_id" not in first
    assert second["service"] == "engine"
    assert second["logger"] == "switchyard.test"
    assert second["level"] == "WARNING"
    assert second["msg"] == "tokens 5"
    assert second["request_id"] == "req-1"
    assert second["num_tokens"] == 5
    assert second["ts"].endswith("+00:00")


def test_exceptions_carry_their_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("gateway")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("x").exception("failed")
    line = json.loads(capsys.readouterr().err)
    assert "RuntimeError: boom" in line["exc"]
