"""Harmony: the encoding loads without network access, and a conversation with a tool call
round-trips: rendered to tokens, the model's reply parsed back into reasoning and a call,
the call and its result rendered into the next prompt."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from openai_harmony import HarmonyEncoding, Message, Role

from gateway.harmony import (
    VOCAB_FILE,
    VOCAB_SHA256,
    HarmonyChat,
    HarmonyInputError,
    ensure_vocab_file,
    load_encoding,
)
from gateway.tool_calls import ParsedDelta, ToolSpec

WEATHER = ToolSpec(
    "get_weather",
    "Weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


@pytest.fixture(scope="module")
def encoding(tmp_path_factory: pytest.TempPathFactory) -> HarmonyEncoding:
    with pytest.MonkeyPatch.context() as patch:
        # Recorded, so the variable that load_encoding sets is undone afterwards.
        patch.setenv("TIKTOKEN_ENCODINGS_BASE", "")
        patch.delenv("TIKTOKEN_ENCODINGS_BASE")
        data_dir = tmp_path_factory.mktemp("harmony-data")
        loaded = load_encoding(data_dir)
        vocab = (data_dir / "tiktoken" / VOCAB_FILE).read_bytes()
        assert hashlib.sha256(vocab).hexdigest() == VOCAB_SHA256
    return loaded


def reply_tokens(encoding: HarmonyEncoding, messages: list[Message]) -> list[int]:
    """What a model writes after the prompt's ``<|start|>assistant``."""
    tokens: list[int] = []
    for message in messages:
        tokens += encoding.render(message)
    start_header = encoding.encode("<|start|>assistant", allowed_special="all")
    assert tokens[: len(start_header)] == start_header
    return tokens[len(start_header) :]


def test_encoding_loads_offline_from_the_shipped_vocabulary(encoding: HarmonyEncoding) -> None:
    chat = HarmonyChat(encoding)
    stops = encoding.encode("<|return|><|call|>", allowed_special="all")
    assert sorted(chat.stop_token_ids()) == sorted(stops)
    assert encoding.decode_utf8(encoding.encode("hello world")) == "hello world"


def test_a_tool_call_round_trips(encoding: HarmonyEncoding) -> None:
    chat = HarmonyChat(encoding)
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    prompt = encoding.decode_utf8(chat.render(conversation, [WEATHER], reasoning_effort="low"))
    assert "Reasoning: low" in prompt and "Answer briefly." in prompt
    assert "type get_weather = " in prompt
    assert prompt.endswith("<|start|>assistant")

    reply = reply_tokens(
        encoding,
        [
            Message.from_role_and_content(Role.ASSISTANT, "Need the weather tool.").with_channel(
                "analysis"
            ),
            Message.from_role_and_content(Role.ASSISTANT, '{"city": "Paris"}')
            .with_channel("commentary")
            .with_recipient("functions.get_weather")
            .with_content_type("<|constrain|>json"),
        ],
    )
    parser = chat.output_parser()
    parsed = ParsedDelta()
    for start in range(0, len(reply), 3):
        parsed.extend(parser.feed("", reply[start : start + 3]))
    parsed.extend(parser.finish())
    assert parsed.reasoning == "Need the weather tool."
    assert parsed.content == ""
    opening, *fragments = parsed.tool_calls
    assert (opening.index, opening.name, opening.arguments) == (0, "get_weather", "")
    assert opening.id is not None
    arguments = "".join(part.arguments for part in fragments)
    assert json.loads(arguments) == {"city": "Paris"}
    assert parser.num_tool_calls == 1

    follow_up = [
        *conversation,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": opening.id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": opening.id, "content": '{"temp_c": 21}'},
    ]
    next_prompt = encoding.decode_utf8(chat.render(follow_up, [WEATHER]))
    assert (
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        '<|message|>{"city": "Paris"}<|call|>'
    ) in next_prompt
    assert (
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp_c": 21}'
        "<|end|>"
    ) in next_prompt

    final = reply_tokens(
        encoding, [Message.from_role_and_content(Role.ASSISTANT, "21 °C.").with_channel("final")]
    )
    answer = chat.output_parser()
    assert answer.feed("", final).content == "21 °C." and answer.num_tool_calls == 0


def test_a_tool_result_for_an_unknown_call_is_refused(encoding: HarmonyEncoding) -> None:
    with pytest.raises(HarmonyInputError, match="matches no earlier tool call"):
        HarmonyChat(encoding).render(
            [{"role": "tool", "tool_call_id": "call_x", "content": "{}"}], [WEATHER]
        )


def test_the_vocabulary_is_written_once(tmp_path: Path) -> None:
    folder = ensure_vocab_file(tmp_path)
    written = (folder / VOCAB_FILE).stat().st_mtime_ns
    assert ensure_vocab_file(tmp_path) == folder
    assert (folder / VOCAB_FILE).stat().st_mtime_ns == written


def test_malformed_output_is_returned_as_content_instead_of_failing(
    encoding: HarmonyEncoding,
) -> None:
    parser = HarmonyChat(encoding).output_parser()
    good = encoding.encode("<|channel|>final<|message|>Hi", allowed_special="all")
    first = parser.feed("Hi", good)
    bad = encoding.encode("<|end|><|start|>assistant<|channel|><|message|>", allowed_special="all")
    later = parser.feed("", bad)
    rest = parser.feed(" there", encoding.encode(" there"))
    assert first.content == "Hi"
    assert later.tool_calls == [] and rest.content == " there"
    assert parser.finish() == ParsedDelta()
