"""Structured output and tool calling end to end: the official ``openai`` and ``anthropic``
clients against the gateway, routing to the real engine service on a random-weight model.

Random weights make the model an adversarial generator: without the grammar mask its output
would be noise, so every output that validates here was made valid by the mask.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest

from engine_service.server import EngineServer
from gateway.route_sources import StaticRoutes
from tests.gateway.conftest import MODEL_NAME, BackgroundLoop, ServedApp, serve_gateway

MESSAGES = [{"role": "user", "content": "Give me the data."}]

# A Hermes-style template (as Qwen's) that renders tools (by name, to fit the small test
# context) and tool turns.
HERMES_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}<|start_header_id|>system<|end_header_id|>\n\nYou may call these tools:\n"
    "{%- for tool in tools %} {{ tool.function.name }}{%- endfor %}\n"
    'Call one as <tool_call>\n{"name": <name>, "arguments": <args>}\n</tool_call><|eot_id|>'
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' }}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- for call in message.tool_calls or [] %}"
    "{{- '<tool_call>\n' + {'name': call.function.name, 'arguments': call.function.arguments}"
    " | tojson + '\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}"
)

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
OPENAI_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMETERS}},
]
PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
ANTHROPIC_TOOLS: list[Any] = [
    {"name": "get_weather", "description": "Weather forecast", "input_schema": WEATHER_PARAMETERS},
    {"name": "get_time", "input_schema": TIME_PARAMETERS},
]


def _short_string(**bounds: Any) -> dict[str, Any]:
    return {"type": "string", "maxLength": 8, **bounds}


SCHEMAS: dict[str, dict[str, Any]] = {
    "flat_object": {
        "type": "object",
        "properties": {"name": _short_string(), "ok": {"type": "boolean"}},
        "required": ["name", "ok"],
        "additionalProperties": False,
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}},
                "required": ["id"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "bounded_array": {
        "type": "array",
        "items": {"type": "integer", "minimum": -5, "maximum": 5},
        "minItems": 2,
        "maxItems": 4,
    },
    "enum_and_const": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green"]}, "kind": {"const": "paint"}},
        "required": ["color", "kind"],
        "additionalProperties": False,
    },
    "any_of": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]},
    "ref_defs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["x"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    "number_bounds": {
        "type": "object",
        "properties": {
            "ratio": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25},
            "count": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 13},
        },
        "required": ["ratio", "count"],
        "additionalProperties": False,
    },
    "string_length_and_pattern": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "tag": {"type": "string", "minLength": 2, "maxLength": 4},
        },
        "required": ["code", "tag"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def hermes_checkpoint(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model, with a Hermes-style chat template that renders tools."""
    target = tmp_path_factory.mktemp("hermes") / "tiny-hermes"
    shutil.copytree(checkpoint, target)
    config_file = target / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = HERMES_TEMPLATE
    config_file.write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def gateways(
    background: BackgroundLoop, checkpoint: Path, hermes_checkpoint: Path, engine: EngineServer
) -> Iterator[dict[str, ServedApp]]:
    """One gateway per tool-call format: Hermes found in its template, the others set."""

    def routes() -> StaticRoutes:
        return StaticRoutes([f"127.0.0.1:{engine.port}"])

    served = {
        "hermes": serve_gateway(background, hermes_checkpoint, routes()),
        "llama3_json": serve_gateway(
            background, checkpoint, routes(), tool_call_parser="llama3_json"
        ),
        "mistral": serve_gateway(background, checkpoint, routes(), tool_call_parser="mistral"),
    }
    yield served
    for app in served.values():
        app.close()


@pytest.fixture(scope="module")
def gateway(gateways: dict[str, ServedApp]) -> ServedApp:
    return gateways["hermes"]


@pytest.fixture(scope="module")
def client(gateway: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def claude(gateway: ServedApp) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.base_url, api_key="unused", max_retries=0)


def openai_client(app: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.base_url}/v1", api_key="unused", max_retries=0)


# -- response_format and vLLM's constraints ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_output_validates_and_stops(client: openai.OpenAI, name: str) -> None:
    schema = SCHEMAS[name]
    completion = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=120,
        temperature=1.0,
        seed=7,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": True},
        },
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_json_object_output_parses_as_an_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=60,
        temperature=0.7,
        seed=1,
        response_format={"type": "json_object"},
    )
    content = completion.choices[0].message.content or ""
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # cut off by max_tokens: still a prefix of an object
        assert content.lstrip().startswith("{")


@pytest.mark.parametrize(
    "extra_body",
    [
        {"structured_outputs": {"regex": r"(cat|dog)-[0-9]{2,4}"}},
        {"guided_regex": r"(cat|dog)-[0-9]{2,4}"},
    ],
    ids=["structured_outputs", "guided_regex"],
)
def test_regex_output_fullmatches(client: openai.OpenAI, extra_body: dict[str, Any]) -> None:
    for seed in range(3):
        completion = client.completions.create(
            model=MODEL_NAME, prompt="Pet:", max_tokens=20, seed=seed, extra_body=extra_body
        )
        assert re.fullmatch(r"(cat|dog)-[0-9]{2,4}", completion.choices[0].text)


def test_grammar_output_follows_the_grammar(client: openai.OpenAI) -> None:
    grammar = 'start: "(" item (" " item)* ")"\nitem: "a" | "bb" | NUMBER\nNUMBER: /[0-9]/\n'
    completion = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=40,
        seed=3,
        extra_body={"structured_outputs": {"grammar": grammar}},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert re.fullmatch(r"\((a|bb|[0-9])( (a|bb|[0-9]))*\)", choice.message.content or "")


# -- tools -------------------------------------------------------------------------------------


def assert_calls_validate(calls: list[tuple[str, str]]) -> None:
    assert calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), PARAMETERS[name])


@pytest.mark.parametrize("format_name", ["hermes", "llama3_json", "mistral"])
@pytest.mark.parametrize("tool_choice", ["required", "named"])
def test_forced_tool_calls_validate_and_stream_the_same(
    gateways: dict[str, ServedApp], format_name: str, tool_choice: str
) -> None:
    client = openai_client(gateways[format_name])
    choice: Any = (
        "required"
        if tool_choice == "required"
        else {"type": "function", "function": {"name": "get_time"}}
    )
    request: dict[str, Any] = dict(
        model=MODEL_NAME,
        messages=MESSAGES,
        tools=OPENAI_TOOLS,
        tool_choice=choice,
        # One call: the adversarial model would otherwise append calls until max_tokens.
        parallel_tool_calls=False,
        max_tokens=100,
        temperature=0,
    )
    completion = client.chat.completions.create(**request)
    result = completion.choices[0]
    assert result.finish_reason == "tool_calls"
    assert result.message.content is None
    calls = [
        (call.function.name, call.function.arguments) for call in result.message.tool_calls or []
    ]
    assert_calls_validate(calls)
    if tool_choice == "named":
        assert [name for name, _ in calls] == ["get_time"]

    chunks = list(client.chat.completions.create(**request, stream=True))
    streamed: dict[int, list[str]] = {}
    for chunk in chunks:
        for part in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            if part.id is not None:
                # The opening delta of a call, exactly as OpenAI sends it.
                assert part.type == "function" and part.function is not None
                assert part.function.arguments == "" and part.index not in streamed
                streamed[part.index] = [part.function.name or "", ""]
            else:
                assert part.function is not None and part.function.name is None
                streamed[part.index][1] += part.function.arguments or ""
    assert [tuple(streamed[index]) for index in sorted(streamed)] == calls
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tools_are_rendered_through_the_template(gateway: ServedApp) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": MESSAGES,
        "max_tokens": 1,
        "tools": OPENAI_TOOLS,
    }
    with_tools = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=body, timeout=60)
    without = httpx.post(
        f"{gateway.base_url}/v1/chat/completions", json={**body, "tool_choice": "none"}, timeout=60
    )
    assert with_tools.status_code == without.status_code == 200
    grown = with_tools.json()["usage"]["prompt_tokens"] - without.json()["usage"]["prompt_tokens"]
    assert grown >= 10, "the tools should be in the prompt"


# -- Anthropic ---------------------------------------------------------------------------------


def test_anthropic_tool_use_round_trip(claude: anthropic.Anthropic) -> None:
    first = claude.messages.create(
        model=MODEL_NAME,
        max_tokens=100,
        system="You forecast weather.",
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"temperature": 0},
    )
    assert first.stop_reason == "tool_use" and first.id.startswith("msg_")
    uses = [block for block in first.content if block.type == "tool_use"]
    assert [use.name for use in uses] == ["get_weather"]
    assert uses[0].id.startswith("toolu_")
    jsonschema.validate(uses[0].input, WEATHER_PARAMETERS)

    second = claude.messages.create(
        model=MODEL_NAME,
        max_tokens=5,
        system="You forecast weather.",
        messages=[
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": first.content},  # type: ignore[typeddict-item]
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": uses[0].id, "content": "12 degrees"}
                ],
            },
        ],
        tools=ANTHROPIC_TOOLS,
    )
    assert second.stop_reason in ("end_turn", "max_tokens")
    # The prompt is the first one plus the call and its result, as the template wrote them.
    assert second.usage.input_tokens >= first.usage.input_tokens + first.usage.output_tokens
    assert all(block.type == "text" for block in second.content)


def parse_events(body: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for frame in body.split("\n\n"):
        if not frame:
            continue
        name_line, data_line = frame.split("\n")
        name = name_line.removeprefix("event: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        events.append((name, data))
    return events


def test_anthropic_stream_sends_the_event_sequence(
    gateway: ServedApp, claude: anthropic.Anthropic
) -> None:
    body = {
        "model": MODEL_NAME,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Time?"}],
        "tools": ANTHROPIC_TOOLS,
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{gateway.base_url}/v1/messages", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = parse_events(reply.read().decode())
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    assert names[2] == "content_block_start" and names[-3] == "content_block_stop"
    start = events[0][1]["message"]
    assert (start["role"], start["content"], start["stop_reason"]) == ("assistant", [], None)
    block = events[2][1]["content_block"]
    assert block["type"] == "tool_use" and block["input"] == {}
    partial = "".join(
        data["delta"]["partial_json"]
        for name, data in events
        if name == "content_block_delta" and data["delta"]["type"] == "input_json_delta"
    )
    jsonschema.validate(json.loads(partial), PARAMETERS[block["name"]])
    final = events[-2][1]
    assert final["delta"]["stop_reason"] == "tool_use" and final["usage"]["output_tokens"] > 0

    sampling = {"temperature": body.pop("temperature")}
    del body["stream"]
    whole = claude.messages.create(**body, extra_body=sampling)
    tool_use = whole.content[0]
    assert tool_use.type == "tool_use"
    assert (tool_use.name, tool_use.input) == (block["name"], json.loads(partial))


def test_anthropic_text_stream_matches_the_message(claude: anthropic.Anthropic) -> None:
    request: dict[str, Any] = dict(
        model=MODEL_NAME,
        max_tokens=8,
        messages=[{"role": "user", "content": "Hello"}],
        metadata={"user_id": "u-1"},
        # Sampling fields the gateway takes, though this client version no longer names them.
        extra_body={"temperature": 0, "top_k": 5},
    )
    with claude.messages.stream(**request) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    whole = claude.messages.create(**request)
    assert text and whole.content[0].type == "text" and whole.content[0].text == text
    assert final.stop_reason == whole.stop_reason == "max_tokens"
    assert final.usage.output_tokens == whole.usage.output_tokens == 8


def test_anthropic_stop_sequence_is_reported(claude: anthropic.Anthropic) -> None:
    request: dict[str, Any] = dict(
        model=MODEL_NAME,
        max_tokens=24,
        messages=[{"role": "user", "content": "Hello"}],
        extra_body={"temperature": 0},
    )
    text = claude.messages.create(**request).content[0].text  # type: ignore[union-attr]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = claude.messages.create(**request, stop_sequences=[stop])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert stopped.content[0].text == text[: text.index(stop)]  # type: ignore[union-attr]


# -- bad input ---------------------------------------------------------------------------------


def openai_error(app: ServedApp, path: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = httpx.post(f"{app.base_url}{path}", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "object", "minProperties": "2"},
                    },
                }
            },
            "JSON schema",
        ),
        ({"structured_outputs": {"regex": "[a-"}}, "regex"),
        ({"guided_grammar": "start: item\n"}, "grammar"),
        ({"guided_json": {"type": "string", "format": "no-such-format"}}, "JSON schema"),
        ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, "at most one"),
        (
            {"tools": OPENAI_TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "not in tools",
        ),
        ({"tools": OPENAI_TOOLS + OPENAI_TOOLS[:1]}, "more than one tool"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "objekt"}},
                    }
                ]
            },
            "tools[0] (f) parameters",
        ),
        ({"tools": [{"type": "function"}]}, "tools.0.function"),
        ({"tool_choice": "required"}, "needs a non-empty tools list"),
    ],
    ids=[
        "bad_schema",
        "bad_regex",
        "bad_grammar",
        "unknown_format",
        "two_constraints",
        "unknown_tool",
        "duplicate_tool",
        "bad_parameters",
        "tool_without_function",
        "required_without_tools",
    ],
)
def test_openai_bad_input_is_400_naming_the_problem(
    gateway: ServedApp, fields: dict[str, Any], named: str
) -> None:
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, **fields}
    error = openai_error(gateway, "/v1/chat/completions", body)
    assert named in error["message"]


def anthropic_error(app: ServedApp, body: dict[str, Any], status: int = 400) -> dict[str, Any]:
    reply = httpx.post(f"{app.base_url}/v1/messages", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    payload = reply.json()
    assert payload["type"] == "error" and set(payload["error"]) == {"type", "message"}
    return payload["error"]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "toolu_x"}],
                    }
                ]
            },
            "must have a corresponding `tool_use` block",
        ),
        ({"tools": ANTHROPIC_TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "nope"),
        ({"tools": [{"name": "f"}]}, "tools.0.input_schema"),
        ({"max_tokens": None}, "max_tokens"),
        ({"temperature": 1.5}, "temperature"),
    ],
    ids=["orphan_tool_result", "unknown_tool", "tool_without_schema", "no_max_tokens", "hot"],
)
def test_anthropic_bad_input_is_400_in_anthropics_format(
    gateway: ServedApp, fields: dict[str, Any], named: str
) -> None:
    body = {
        "model": MODEL_NAME,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}],
        **fields,
    }
    body = {key: value for key, value in body.items() if value is not None}
    error = anthropic_error(gateway, body)
    assert error["type"] == "invalid_request_error" and named in error["message"]


def test_anthropic_unknown_model_is_404_not_found(gateway: ServedApp) -> None:
    body = {"model": "nope", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    assert anthropic_error(gateway, body, 404)["type"] == "not_found_error"


def test_anthropic_client_raises_its_own_error_types(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as raised:
        claude.messages.create(
            model=MODEL_NAME,
            max_tokens=4,
            messages=[{"role": "user", "content": "hi"}],
            tools=ANTHROPIC_TOOLS,
            tool_choice={"type": "tool", "name": "missing"},
        )
    assert raised.value.status_code == 400
    assert "missing" in str(raised.value)
