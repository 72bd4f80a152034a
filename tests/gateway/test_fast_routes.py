"""The generation routes called directly (``gateway/fast_routes.py``) answer exactly as
FastAPI's routed path does: the same bodies, errors and headers, for valid requests and for
every kind of malformed one. Two gateways on one real engine, one with the direct routes
and one without, get the same requests."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine_service.server import EngineServer
from gateway.app import FAST_PATHS, create_app
from gateway.fast_routes import FastRoutes
from gateway.route_sources import StaticRoutes
from tests.gateway.conftest import (
    MODEL_NAME,
    BackgroundLoop,
    ServedApp,
    gateway_settings,
    serve_gateway,
)

JSON = {"content-type": "application/json"}
GREEDY = {"temperature": 0, "ignore_eos": True, "max_tokens": 4}
COMPLETION = {"model": MODEL_NAME, "prompt": "The sea is", **GREEDY}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi 🌊"}], **GREEDY}
MESSAGES = {
    "model": MODEL_NAME,
    "max_tokens": 4,
    "temperature": 0,
    "messages": [{"role": "user", "content": "hi"}],
}


def encoded(body: Any) -> bytes:
    return json.dumps(body).encode()


# (path, headers, raw body): what a client may send, valid and not.
CASES: list[tuple[str, dict[str, str], bytes]] = [
    ("/v1/completions", JSON, encoded(COMPLETION)),
    ("/v1/completions", JSON, encoded({**COMPLETION, "stream": True})),
    (
        "/v1/completions",
        JSON,
        encoded({**COMPLETION, "stream": True, "stream_options": {"include_usage": True}}),
    ),
    ("/v1/completions", JSON, encoded({**COMPLETION, "prompt": [5, 6, 7]})),
    ("/v1/chat/completions", JSON, encoded(CHAT)),
    ("/v1/chat/completions", JSON, encoded({**CHAT, "stream": True})),
    ("/v1/messages", JSON, encoded(MESSAGES)),
    ("/v1/messages", JSON, encoded({**MESSAGES, "stream": True})),
    # Content types FastAPI parses as JSON too, and ones it does not.
    ("/v1/completions", {"content-type": "application/json; charset=utf-8"}, encoded(COMPLETION)),
    ("/v1/completions", {"content-type": "Application/JSON"}, encoded(COMPLETION)),
    ("/v1/completions", {"content-type": "text/plain"}, encoded(COMPLETION)),
    ("/v1/completions", {}, encoded(COMPLETION)),
    ("/v1/messages", {"content-type": "text/plain"}, encoded(MESSAGES)),
    # Bodies that are not JSON, or not the model.
    ("/v1/completions", JSON, b""),
    ("/v1/completions", JSON, b"{"),
    ("/v1/completions", JSON, b"\xff\xfe{}"),
    ("/v1/completions", JSON, b"[]"),
    ("/v1/completions", JSON, b"null"),
    ("/v1/completions", JSON, encoded({**COMPLETION, "max_tokens": "many"})),
    ("/v1/completions", JSON, encoded({"model": MODEL_NAME})),
    ("/v1/completions", JSON, b'{"model": "tiny", "prompt": "x", "temperature": NaN}'),
    ("/v1/chat/completions", JSON, encoded({"model": MODEL_NAME})),
    ("/v1/chat/completions", JSON, encoded({**CHAT, "messages": [{"role": "robot"}]})),
    ("/v1/chat/completions", JSON, b"{"),
    ("/v1/messages", JSON, b"{"),
    ("/v1/messages", JSON, encoded({**MESSAGES, "max_tokens": -1})),
    # Valid bodies the handlers refuse.
    ("/v1/completions", JSON, encoded({**COMPLETION, "model": "no-such-model"})),
    ("/v1/completions", JSON, encoded({**COMPLETION, "n": 1000})),
    ("/v1/completions", JSON, encoded({**COMPLETION, "stream_options": {"include_usage": True}})),
    ("/v1/completions", JSON, encoded({**COMPLETION, "max_tokens": 100_000})),
    ("/v1/chat/completions", JSON, encoded({**CHAT, "top_logprobs": 2})),
    ("/v1/messages", JSON, encoded({**MESSAGES, "model": "no-such-model"})),
]

_IDS = re.compile(rb"(chatcmpl|cmpl|msg)[-_][0-9A-Za-z]+")
_CREATED = re.compile(rb'"created":\s*\d+')


def normalized(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body with what differs between any two requests masked: ids,
    timestamps, the date."""
    headers = sorted(
        (name, value)
        for name, value in response.headers.items()
        if name not in ("date", "x-request-id", "content-length")
    )
    body = _CREATED.sub(b'"created":0', _IDS.sub(rb"\1-ID", response.content))
    return response.status_code, headers, body


@pytest.fixture(scope="module")
def gateways(
    background: BackgroundLoop, checkpoint: Path, engine: EngineServer
) -> Iterator[tuple[ServedApp, ServedApp]]:
    routes = [f"127.0.0.1:{engine.port}"]
    direct = serve_gateway(background, checkpoint, StaticRoutes(routes), max_n=4)
    routed = serve_gateway(background, checkpoint, StaticRoutes(routes), fast_routes=False, max_n=4)
    yield direct, routed
    direct.close()
    routed.close()


def test_the_generation_routes_are_taken_directly(checkpoint: Path) -> None:
    app = create_app(gateway_settings(checkpoint), routes_source=StaticRoutes([]))
    layer: Any = app.build_middleware_stack()
    while layer is not None and not isinstance(layer, FastRoutes):
        layer = getattr(layer, "app", None) or getattr(layer, "_app", None)
    assert layer is not None, "FastRoutes is not in the middleware stack"
    assert layer.paths() == set(FAST_PATHS)


@pytest.mark.parametrize(("path", "headers", "body"), CASES)
def test_direct_and_routed_answers_are_the_same(
    gateways: tuple[ServedApp, ServedApp], path: str, headers: dict[str, str], body: bytes
) -> None:
    direct, routed = gateways
    answers = [
        normalized(
            httpx.post(f"{served.base_url}{path}", headers=headers, content=body, timeout=60)
        )
        for served in (direct, routed)
    ]
    assert answers[0] == answers[1]


def test_a_body_sent_in_pieces_is_read_whole(gateways: tuple[ServedApp, ServedApp]) -> None:
    direct, _ = gateways
    payload = encoded(COMPLETION)

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(payload), 7):
            yield payload[start : start + 7]

    response = httpx.post(
        f"{direct.base_url}/v1/completions", headers=JSON, content=pieces(), timeout=60
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4
