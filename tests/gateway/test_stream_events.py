"""Streamed chunks that carry only text are framed from a template: the bytes must be the ones
pydantic writes for the same chunk, whatever the text, and every other chunk (logprobs,
finish reasons, tool calls, reasoning) must still be built as before."""

from __future__ import annotations

import json
import re
from typing import Any, cast

import pytest

from gateway.generation import SampleDelta
from gateway.openai_routes import _ChatShape, _CompletionShape, _Shape, _sse_events
from gateway.tool_calls import HermesParser, PlainText
from switchyard.v1 import common_pb2

TEXTS = [
    "hello",
    " world",
    'quote " and back\\slash',
    "".join(chr(code) for code in range(32)),  # every control character
    "\u2028\u2029\x7f",
    "😀 你好 déjà",
    "\x00text\x00",  # the template's own marker
    "</tool_call> {}",
]


class NoTokenizer:
    def token_text(self, token_id: int) -> str:
        return f"<{token_id}>"


def completion_shapes(model: str, **kwargs: Any) -> tuple[_Shape, _Shape]:
    """Two shapes of one request: one framed through ``events``, one through ``chunks``."""
    args = (cast(Any, NoTokenizer()), "cmpl-1", model, 2)
    fast, slow = _CompletionShape(*args, **kwargs), _CompletionShape(*args, **kwargs)
    slow.created = fast.created
    return fast, slow


def chat_shapes(model: str, parser: type, **kwargs: Any) -> tuple[_Shape, _Shape]:
    def shape() -> _ChatShape:
        return _ChatShape(
            cast(Any, NoTokenizer()),
            "chatcmpl-1",
            model,
            2,
            parsers=[parser(), parser()],
            **kwargs,
        )

    fast, slow = shape(), shape()
    slow.created = fast.created
    return fast, slow


def deltas() -> list[SampleDelta]:
    out = [
        SampleDelta(index=position % 2, text=text, logprobs=[], num_tokens=position + 1)
        for position, text in enumerate(TEXTS)
    ]
    out.append(SampleDelta(index=0, text="", logprobs=[], num_tokens=20))  # nothing to send
    out += [
        SampleDelta(index=i, text="end", logprobs=[], finish_reason="length", num_tokens=30)
        for i in (0, 1)
    ]
    return out


@pytest.mark.parametrize("exclude", [None, {"usage"}])
@pytest.mark.parametrize("model", ["tiny", 'odd "model" \x00text\x00'])
@pytest.mark.parametrize("kind", ["completion", "chat", "chat_with_tools"])
def test_text_events_are_the_bytes_pydantic_writes(
    kind: str, model: str, exclude: set[str] | None
) -> None:
    if kind == "completion":
        fast, slow = completion_shapes(model, with_logprobs=False)
    else:
        fast, slow = chat_shapes(
            model, HermesParser if kind == "chat_with_tools" else PlainText, with_logprobs=False
        )
    for delta in deltas():
        framed = fast.events(delta, exclude)
        assert framed == _sse_events(slow.chunks(delta), exclude)
        for line in framed.split(b"\n\n")[:-1]:
            json.loads(line.removeprefix(b"data: "))  # each event is one JSON object
    assert fast.texts == slow.texts and fast.finish_reasons == slow.finish_reasons


def test_chunks_with_logprobs_are_still_built_whole() -> None:
    fast, slow = completion_shapes("tiny", with_logprobs=True)
    entry = common_pb2.TokenLogprob(token_id=3, logprob=-0.25)
    delta = SampleDelta(index=0, text="abc", logprobs=[entry], token_ids=[3], num_tokens=1)
    framed = fast.events(delta, None)
    assert framed == _sse_events(slow.chunks(delta), None)
    choice = json.loads(framed.removeprefix(b"data: "))["choices"][0]
    assert choice["logprobs"]["tokens"] == ["<3>"] and choice["logprobs"]["token_logprobs"] == [
        -0.25
    ]


def test_a_tool_call_is_framed_as_tool_call_chunks() -> None:
    fast, slow = chat_shapes("tiny", HermesParser, with_logprobs=False)
    text = 'Sure.<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    delta = SampleDelta(index=0, text=text, logprobs=[], num_tokens=5)
    framed = fast.events(delta, {"usage"})
    call_ids = re.compile(rb'"id":"call_[^"]*"')  # drawn at random per call
    expected = _sse_events(slow.chunks(delta), {"usage"})
    assert call_ids.sub(b"ID", framed) == call_ids.sub(b"ID", expected)
    events = [json.loads(e.removeprefix(b"data: ")) for e in framed.split(b"\n\n")[:-1]]
    assert events[0]["choices"][0]["delta"] == {"content": "Sure."}
    assert events[1]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "f"
