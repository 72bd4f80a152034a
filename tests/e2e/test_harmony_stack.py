"""gpt-oss through ``switchyard up``, in Harmony, with the ``openai`` client: a chat answer,
and a tool call round trip (the model's call parsed into ``tool_calls``, the call and its
result rendered back into Harmony for the next turn, the final answer parsed as content).

The checkpoint is a tiny gpt-oss that has memorised its replies to these conversations
(``harmony_checkpoint.py``), so the test can check exact answers: the gateway picks Harmony
from ``config.json``, renders the prompts the model was trained on, and the engine's gpt-oss
(sinks, sliding and full layers, experts) must reproduce the memorised tokens greedily.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from openai_harmony import Message, Role

from gateway.harmony import HarmonyChat, load_encoding
from gateway.tool_calls import ToolSpec
from tests.e2e.harmony_checkpoint import (
    make_harmony_checkpoint,
    o200k_harmony_tokenizer,
    reply_tokens,
)
from tests.e2e.stack import API_KEY, MODEL_NAME, Stack, start_stack, stop_stack

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ASK = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Weather in Paris?"},
]
ARGUMENTS = '{"city": "Paris"}'
TOOL_RESULT = "sunny, 21 C"
HELLO = [{"role": "user", "content": "Say hello."}]


def assistant(text: str, channel: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def answered_call(call_id: str) -> list[dict]:
    """The conversation after the call, as the client sends it back."""
    call = {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": ARGUMENTS},
    }
    return [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": TOOL_RESULT},
    ]


@pytest.fixture(scope="module")
def harmony_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("harmony")
    data_dir = work / "data"
    encoding = load_encoding(data_dir)
    chat = HarmonyChat(encoding)
    function = WEATHER["function"]
    tools = [ToolSpec(function["name"], function["description"], function["parameters"])]
    call = (
        assistant(ARGUMENTS, "commentary")
        .with_recipient("functions.get_weather")
        .with_content_type("<|constrain|>json")
    )
    dialogues = [
        (
            chat.render(ASK, tools),
            reply_tokens(encoding, [assistant("Need the weather tool.", "analysis"), call]),
        ),
        (
            chat.render(answered_call("any"), tools),
            reply_tokens(encoding, [assistant("It is sunny in Paris.", "final")]),
        ),
        (
            chat.render(HELLO, []),
            reply_tokens(
                encoding, [assistant("Greet them.", "analysis"), assistant("Hello!", "final")]
            ),
        ),
    ]
    checkpoint = make_harmony_checkpoint(
        work / "gpt-oss", o200k_harmony_tokenizer(encoding), dialogues
    )
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "gpt_oss"
    (work / "stack").mkdir()
    started = start_stack(checkpoint, work / "stack", engines=1, data_dir=data_dir)
    yield started
    stop_stack(started)


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0)


def test_gpt_oss_answers_a_chat_with_its_reasoning_apart(harmony_stack: Stack) -> None:
    reply = client(harmony_stack).chat.completions.create(
        model=MODEL_NAME, messages=HELLO, temperature=0, max_tokens=40
    )
    message = reply.choices[0].message
    assert message.content == "Hello!"
    assert message.model_extra.get("reasoning_content") == "Greet them."
    assert reply.choices[0].finish_reason == "stop"


def test_gpt_oss_tool_call_round_trip(harmony_stack: Stack) -> None:
    api = client(harmony_stack)
    first = api.chat.completions.create(
        model=MODEL_NAME, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=60
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.model_extra.get("reasoning_content") == "Need the weather tool."

    second = api.chat.completions.create(
        model=MODEL_NAME,
        messages=answered_call(call.id),
        tools=[WEATHER],
        temperature=0,
        max_tokens=60,
    )
    assert second.choices[0].message.content == "It is sunny in Paris."
    assert not second.choices[0].message.tool_calls
    assert second.choices[0].finish_reason == "stop"


def test_gpt_oss_tool_call_streams(harmony_stack: Stack) -> None:
    stream = client(harmony_stack).chat.completions.create(
        model=MODEL_NAME, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=60, stream=True
    )
    names, arguments, finish = [], "", None
    for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            if delta_call.function.name:
                names.append(delta_call.function.name)
            arguments += delta_call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert names == ["get_weather"]
    assert json.loads(arguments) == {"city": "Paris"}
    assert finish == "tool_calls"
