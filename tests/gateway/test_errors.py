"""Every malformed or unservable request gets OpenAI's error JSON with the right status,
and the gateway keeps serving. No engine runs here: requests that pass validation find no
replica and are answered 503."""

from __future__ import annotations

import ast
import hmac
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway import access
from gateway.access import AccessControl
from gateway.api_keys import hash_key, load_config_keys
from gateway.app import create_app
from gateway.quota import DefaultLimits, MemoryQuota
from gateway.route_sources import StaticRoutes
from tests.gateway.conftest import MAX_MODEL_LEN, MODEL_NAME, gateway_settings

KEY = "sk-test-key"
CHAT = "/v1/chat/completions"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def client(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text("# gateway keys\nsk-from-file\n\n")
    settings = gateway_settings(checkpoint, api_keys=[KEY], api_key_file=key_file, max_n=4)
    with TestClient(create_app(settings, routes_source=StaticRoutes([]))) as test_client:
        yield test_client


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], **fields}


def assert_openai_error(
    response: Any, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic sk-test-key", "Bearer "])
def test_missing_or_wrong_key_is_401(client: TestClient, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    error = assert_openai_error(
        client.post(CHAT, json=chat_body(), headers=headers), 401, code="invalid_api_key"
    )
    assert error["type"] == "invalid_request_error"


def test_key_check_runs_before_body_validation(client: TestClient) -> None:
    assert_openai_error(
        client.post(CHAT, content=b"{not json", headers={"Content-Type": "application/json"}), 401
    )


def test_keys_from_settings_and_file_are_accepted(client: TestClient) -> None:
    for key in (KEY, "sk-from-file"):
        assert (
            client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        )


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fail-open check against configured keys compares hashes, every one of them."""
    calls: list[tuple[str, str]] = []
    compare_digest = hmac.compare_digest

    def recording_compare(a: str, b: str) -> bool:
        calls.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", recording_compare)
    control = AccessControl(
        MemoryQuota(),
        load_config_keys(["k1", "k2"], None),
        DefaultLimits(),
        auth_enabled=True,
        fail_open=True,
    )
    assert control.is_config_key(hash_key("k1"))
    # every key compared, even after a match, and never the key in clear
    assert calls == [(hash_key("k1"), hash_key("k1")), (hash_key("k2"), hash_key("k1"))]


def test_no_keys_configured_means_open() -> None:
    control = AccessControl(
        MemoryQuota(),
        load_config_keys([], None),
        DefaultLimits(),
        auth_enabled=False,
        fail_open=True,
    )
    assert not control.limits_enabled


def test_a_key_file_without_keys_fails_closed(tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# the keys were never written here\n\n")
    with pytest.raises(ValueError, match="no API key"):
        load_config_keys([], key_file)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": None}, "messages"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"n": 5}, "n"),
        ({"n": 0}, "n"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages.0.tool_call_id"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            # A text-only model: the image part is named.
            "messages.0.content.0.image_url",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "text": "x"}]}]},
            "messages.0.content",
        ),
    ],
)
def test_invalid_chat_request_is_400(
    client: TestClient, fields: dict[str, Any], param: str
) -> None:
    body = chat_body(**fields)
    body = {key: value for key, value in body.items() if value is not None}
    error = assert_openai_error(client.post(CHAT, json=body, headers=HEADERS), 400, param=param)
    assert error["type"] == "invalid_request_error"


def test_missing_messages_is_400(client: TestClient) -> None:
    assert_openai_error(
        client.post(CHAT, json={"model": MODEL_NAME}, headers=HEADERS), 400, param="messages"
    )


def test_invalid_json_is_400_not_422(client: TestClient) -> None:
    response = client.post(
        CHAT,
        content=b'{"model": "tiny", "messages": [',
        headers={**HEADERS, "Content-Type": "application/json"},
    )
    assert "JSON" in assert_openai_error(response, 400)["message"]


def test_unknown_model_is_404_model_not_found(client: TestClient) -> None:
    response = client.post(CHAT, json=chat_body(model="gpt-9"), headers=HEADERS)
    assert_openai_error(response, 404, param="model", code="model_not_found")


def test_prompt_plus_max_tokens_beyond_context_is_400(client: TestClient) -> None:
    response = client.post(CHAT, json=chat_body(max_tokens=MAX_MODEL_LEN), headers=HEADERS)
    assert_openai_error(response, 400, code="context_length_exceeded")
    long_prompt = {"model": MODEL_NAME, "prompt": "word " * (MAX_MODEL_LEN * 2)}
    assert_openai_error(
        client.post("/v1/completions", json=long_prompt, headers=HEADERS),
        400,
        code="context_length_exceeded",
    )


def test_invalid_completion_requests_are_400(client: TestClient) -> None:
    for body, param in [
        ({"model": MODEL_NAME}, "prompt"),
        ({"model": MODEL_NAME, "prompt": "x", "logprobs": 21}, "logprobs"),
        ({"model": MODEL_NAME, "prompt": ["a", "b"]}, "prompt"),
        ({"model": MODEL_NAME, "prompt": "x", "echo": True}, "echo"),
        ({"model": MODEL_NAME, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ]:
        assert_openai_error(
            client.post("/v1/completions", json=body, headers=HEADERS), 400, param=param
        )


def test_no_ready_replica_is_503(client: TestClient) -> None:
    for stream in (False, True):
        response = client.post(CHAT, json=chat_body(stream=stream), headers=HEADERS)
        assert_openai_error(response, 503, code="no_replica_available")


def test_health_is_503_without_a_ready_engine(client: TestClient) -> None:
    assert client.get("/health").status_code == 503


def test_unknown_route_is_404_in_openai_format(client: TestClient) -> None:
    assert_openai_error(client.get("/v1/nothing", headers=HEADERS), 404)


def test_models_lists_the_served_model(client: TestClient) -> None:
    models = client.get("/v1/models", headers=HEADERS).json()
    assert models["object"] == "list"
    assert [(card["id"], card["object"]) for card in models["data"]] == [(MODEL_NAME, "model")]


def test_a_model_is_retrieved_by_id_and_an_unknown_one_is_404(client: TestClient) -> None:
    card = client.get(f"/v1/models/{MODEL_NAME}", headers=HEADERS).json()
    assert (card["id"], card["object"]) == (MODEL_NAME, "model")
    assert_openai_error(
        client.get("/v1/models/gpt-9", headers=HEADERS), 404, param="model", code="model_not_found"
    )


def test_errors_are_counted_in_metrics(client: TestClient) -> None:
    client.post(CHAT, json=chat_body(model="nope"), headers=HEADERS)
    text = client.get("/metrics").text
    assert 'switchyard_gateway_requests_total{endpoint="/v1/chat/completions",status="404"}' in text


MESSAGES_BODY = {
    "model": MODEL_NAME,
    "max_tokens": 4,
    "messages": [{"role": "user", "content": "hi"}],
}


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"}, {"Authorization": "Bearer no"}])
def test_anthropic_missing_or_wrong_key_is_401_authentication_error(
    client: TestClient, headers: dict[str, str]
) -> None:
    response = client.post("/v1/messages", json=MESSAGES_BODY, headers=headers)
    assert response.status_code == 401
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("headers", [{"x-api-key": KEY}, HEADERS])
def test_anthropic_accepts_x_api_key_and_bearer(
    client: TestClient, headers: dict[str, str]
) -> None:
    # The key is accepted; with no replica the request is then refused as overloaded.
    response = client.post("/v1/messages", json=MESSAGES_BODY, headers=headers)
    assert response.status_code == 503
    assert response.json() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": response.json()["error"]["message"]},
    }


def test_x_api_key_also_opens_the_openai_routes(client: TestClient) -> None:
    assert client.get("/v1/models", headers={"x-api-key": KEY}).status_code == 200


def test_anthropic_invalid_json_is_400_in_anthropic_format(client: TestClient) -> None:
    response = client.post(
        "/v1/messages",
        content=b"{oops",
        headers={"x-api-key": KEY, "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("token_id", [-1, 1 << 40])
def test_completion_prompt_token_ids_outside_the_vocabulary_are_400(
    client: TestClient, token_id: int
) -> None:
    body = {"model": MODEL_NAME, "prompt": [1, token_id], "max_tokens": 1}
    response = client.post("/v1/completions", json=body, headers=HEADERS)
    assert_openai_error(response, 400, param="prompt")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stop_token_ids", [-1]),
        ("seed", 1 << 64),
        ("top_k", 1 << 31),
        ("min_tokens", 1 << 32),
    ],
)
def test_sampling_values_the_engine_cannot_take_are_400(
    client: TestClient, field: str, value: Any
) -> None:
    response = client.post(CHAT, json=chat_body(**{field: value}), headers=HEADERS)
    error = assert_openai_error(response, 400)
    assert error["param"].split(".")[0] == field


def test_anthropic_top_k_beyond_int32_is_400(client: TestClient) -> None:
    body = {
        "model": MODEL_NAME,
        "max_tokens": 4,
        "top_k": 1 << 31,
        "messages": [{"role": "user", "content": "hi"}],
    }
    response = client.post("/v1/messages", json=body, headers=HEADERS)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_error_has_openais_type(client: TestClient) -> None:
    response = client.post(CHAT, json=chat_body(model="gpt-9"), headers=HEADERS)
    # OpenAI answers a model that does not exist with an invalid_request_error (status 404).
    assert assert_openai_error(response, 404)["type"] == "invalid_request_error"


def test_stream_options_without_stream_is_400(client: TestClient) -> None:
    body = chat_body(stream_options={"include_usage": True})
    response = client.post(CHAT, json=body, headers=HEADERS)
    assert_openai_error(response, 400, param="stream_options")


@pytest.mark.parametrize(
    "tool_calls",
    [
        "not a list",
        [{"id": "call_1", "type": "function"}],
        [{"id": "call_1", "type": "function", "function": {"arguments": "{}"}}],
    ],
)
def test_malformed_assistant_tool_calls_are_400(client: TestClient, tool_calls: Any) -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": tool_calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    response = client.post(CHAT, json=chat_body(messages=messages), headers=HEADERS)
    error = assert_openai_error(response, 400)
    assert error["param"].startswith("messages.1.tool_calls")


def test_the_anthropic_routes_stand_on_the_shared_layer_not_on_the_openai_routes() -> None:
    source = (Path(__file__).parents[2] / "gateway" / "anthropic_routes.py").read_text()
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "gateway.openai_routes" not in imported and "gateway.serving" in imported
    assert "OpenAIError" not in source
