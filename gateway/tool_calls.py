"""Tool calls in the formats models write them: detecting the format, parsing the output as
it streams, and the grammar that forces a call.

Three text formats are known, each named the way vLLM names its parser:

| format | what the model writes |
| --- | --- |
| ``hermes`` (Hermes, Qwen) | ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, once per call |
| ``llama3_json`` (Llama 3.x) | ``{"name": ..., "parameters": {...}}``, calls separated by ``; `` |
| ``mistral`` | ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` |

A parser turns text deltas into content deltas and tool-call deltas shaped the way OpenAI
streams them: a call's first delta carries its id and name (with empty arguments), the next
ones carry fragments of the arguments' JSON text, copied as the model writes it. Non-streamed
responses run the same parser over the whole output, so both agree to the character.

Harmony (gpt-oss) is a token-level format of its own: :mod:`gateway.harmony`.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

ToolFormat = Literal["hermes", "llama3_json", "mistral"]

_ARGUMENT_KEYS = ("arguments", "parameters")
_WHITESPACE = " \t\r\n"
_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id(prefix: str = "call_") -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def detect_tool_format(chat_template: str, vocabulary: set[str]) -> ToolFormat:
    """The format a model writes tool calls in, from its chat template and its added tokens.

    The template is the better witness (it shows the model the format); a model whose
    template says nothing is judged by its special tokens, and Hermes is the fallback.
    """
    template_markers: list[tuple[str, ToolFormat]] = [
        ("<tool_call>", "hermes"),
        ("[TOOL_CALLS]", "mistral"),
        ("<|python_tag|>", "llama3_json"),
        ('"parameters"', "llama3_json"),
    ]
    for marker, format_name in template_markers:
        if marker in chat_template:
            return format_name
    for marker, format_name in (
        ("<tool_call>", "hermes"),
        ("[TOOL_CALLS]", "mistral"),
        ("<|python_tag|>", "llama3_json"),
    ):
        if marker in vocabulary:
            return format_name
    return "hermes"


# -- parsing ---------------------------------------------------------------------------------


@dataclass(slots=True)
class ToolCallDelta:
    """Part of one tool call: the first part of a call has ``id`` and ``name``."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass(slots=True)
class ParsedDelta:
    """What a piece of output adds: visible text, reasoning text, tool-call parts."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def extend(self, other: ParsedDelta) -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls.extend(other.tool_calls)


class OutputParser(ABC):
    """Splits one sample's output into content, reasoning and tool calls, incrementally."""

    @property
    @abstractmethod
    def num_tool_calls(self) -> int: ...

    @abstractmethod
    def feed(self, text: str, token_ids: list[int]) -> ParsedDelta:
        """Parses a delta of output (its text and the tokens behind it)."""

    @abstractmethod
    def finish(self) -> ParsedDelta:
        """Releases whatever was held back, at the end of the sample."""


class PlainText(OutputParser):
    """No tools: the output is all content."""

    @property
    def num_tool_calls(self) -> int:
        return 0

    def feed(self, text: str, token_ids: list[int]) -> ParsedDelta:
        return ParsedDelta(content=text)

    def finish(self) -> ParsedDelta:
        return ParsedDelta()


class _CallObject:
    """Reads one ``{"name": ..., "arguments"|"parameters": ...}`` object, a character at a
    time, and knows at each point the name (once its string closed) and the arguments' text
    so far. Only the object's own level (depth 1) is interpreted; nested values are copied.
    """

    __slots__ = (
        "_escape",
        "_expect_key",
        "_in_string",
        "_key",
        "_string_start",
        "_value_key",
        "_value_start",
        "arguments_end",
        "arguments_start",
        "depth",
        "done",
        "name",
        "text",
    )

    def __init__(self) -> None:
        self.text = ""
        self.depth = 0
        self.done = False
        self.name: str | None = None
        self.arguments_start = -1
        self.arguments_end = -1
        self._in_string = False
        self._escape = False
        self._expect_key = False
        self._key: str | None = None
        self._string_start = -1
        self._value_key: str | None = None
        self._value_start = -1

    def arguments(self) -> str:
        """The arguments' text written so far (all of it once the value has closed)."""
        if self.arguments_end >= 0:
            return self.text[self.arguments_start : self.arguments_end]
        if self._value_key in _ARGUMENT_KEYS and self._value_start >= 0:
            return self.text[self._value_start :]
        return ""

    def feed(self, text: str) -> int:
        """Consumes characters until the object closes; returns how many it consumed, or -1
        when ``text`` does not start an object (only whitespace may precede the brace)."""
        for offset, char in enumerate(text):
            if self.done:
                return offset
            if self.depth == 0:
                if char in _WHITESPACE:
                    continue
                if char != "{":
                    return -1
            self._step(char)
        return len(text)

    def _step(self, char: str) -> None:
        position = len(self.text)
        self.text += char
        if self._in_string:
            if self._escape:
                self._escape = False
            elif char == "\\":
                self._escape = True
            elif char == '"':
                self._in_string = False
                if self.depth == 1:
                    self._string_closed(position)
            return
        if char == '"':
            self._in_string = True
            if self.depth == 1:
                self._string_start = position
                self._open_value(position)
        elif char in "{[":
            if self.depth == 1:
                self._open_value(position)
            self.depth += 1
            if self.depth == 1:
                self._expect_key = True
        elif char in "}]":
            if self.depth == 1:
                self._close_scalar(position)
            self.depth -= 1
            if self.depth == 1 and self._value_start >= 0:
                self._value_done(position + 1)
            elif self.depth == 0:
                self.done = True
        elif self.depth == 1:
            if char == ":":
                self._value_key = self._key
            elif char == ",":
                self._close_scalar(position)
                self._expect_key = True
            elif char not in _WHITESPACE:
                self._open_value(position)

    def _open_value(self, position: int) -> None:
        if not self._expect_key and self._value_key is not None and self._value_start < 0:
            self._value_start = position

    def _string_closed(self, position: int) -> None:
        if self._expect_key:
            self._key = json.loads(self.text[self._string_start : position + 1])
            self._expect_key = False
        elif self._value_start == self._string_start:
            self._value_done(position + 1)

    def _close_scalar(self, position: int) -> None:
        if self._value_start >= 0:
            end = position
            while end > self._value_start and self.text[end - 1] in _WHITESPACE:
                end -= 1
            self._value_done(end)

    def _value_done(self, end: int) -> None:
        value = self.text[self._value_start : end]
        if self._value_key == "name":
            try:
                name = json.loads(value)
            except json.JSONDecodeError:
                name = None
            self.name = name if isinstance(name, str) else None
        elif self._value_key in _ARGUMENT_KEYS:
            self.arguments_start, self.arguments_end = self._value_start, end
        self._value_key = None
        self._value_start = -1


class ToolCallParser(OutputParser):
    """The text formats' shared machinery: content outside calls, and calls read object by
    object, each streamed as soon as its name is known.

    Whitespace at the end of content is held back until more content follows, so that the
    newlines models put before a call do not reach the client as content.
    """

    def __init__(self, *, id_prefix: str = "call_") -> None:
        self._id_prefix = id_prefix
        self._held_space = ""
        self._call: _CallObject | None = None
        self._call_index = -1
        self._announced = False
        self._sent_arguments = 0
        self._num_calls = 0

    @property
    def num_tool_calls(self) -> int:
        return self._num_calls

    def feed(self, text: str, token_ids: list[int]) -> ParsedDelta:
        out = ParsedDelta()
        self._parse(text, out)
        return out

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        self._flush(out)
        if self._call is not None and not self._announced:
            # Never became a call (no name): it was content after all.
            out.content += self._call.text
        self._call = None
        if self._num_calls == 0:
            out.content += self._held_space
        self._held_space = ""
        return out

    @abstractmethod
    def _parse(self, text: str, out: ParsedDelta) -> None: ...

    @abstractmethod
    def _flush(self, out: ParsedDelta) -> None:
        """Releases text held in the format's own buffer at the end of the output."""

    def _content(self, text: str, out: ParsedDelta) -> None:
        combined = self._held_space + text
        visible = combined.rstrip(_WHITESPACE)
        self._held_space = combined[len(visible) :]
        out.content += visible

    def _start_call(self) -> None:
        self._held_space = ""
        self._call = _CallObject()
        self._announced = False
        self._sent_arguments = 0

    def _feed_call(self, text: str, out: ParsedDelta) -> int:
        """Feeds the open call; returns characters consumed (-1: not a call object)."""
        call = self._call
        assert call is not None
        consumed = call.feed(text)
        if consumed < 0:
            return consumed
        if not self._announced and call.name is not None:
            self._announced = True
            self._call_index = self._num_calls
            self._num_calls += 1
            out.tool_calls.append(
                ToolCallDelta(
                    index=self._call_index,
                    arguments="",
                    id=new_call_id(self._id_prefix),
                    name=call.name,
                )
            )
        if self._announced:
            arguments = call.arguments()
            if call.done and not arguments and call.arguments_start < 0:
                arguments = "{}"  # a call without arguments
            if len(arguments) > self._sent_arguments:
                out.tool_calls.append(
                    ToolCallDelta(
                        index=self._call_index, arguments=arguments[self._sent_arguments :]
                    )
                )
                self._sent_arguments = len(arguments)
        return consumed

    def _end_call(self, out: ParsedDelta) -> None:
        """Closes the current call; one that never got a name is content after all."""
        call = self._call
        assert call is not None
        if not self._announced:
            self._content(call.text, out)
        self._call = None


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


class HermesParser(ToolCallParser):
    """``<tool_call>{...}</tool_call>`` blocks among content (Hermes, Qwen)."""

    OPEN = "<tool_call>"
    CLOSE = "</tool_call>"

    def __init__(self, *, id_prefix: str = "call_") -> None:
        super().__init__(id_prefix=id_prefix)
        self._buffer = ""
        self._closing = False  # between a call's closing brace and its closing tag

    def _parse(self, text: str, out: ParsedDelta) -> None:
        self._buffer += text
        while self._buffer:
            if self._closing:
                end = self._buffer.find(self.CLOSE)
                if end < 0:
                    return
                self._buffer = self._buffer[end + len(self.CLOSE) :]
                self._closing = False
            elif self._call is not None:
                consumed = self._feed_call(self._buffer, out)
                if consumed < 0:  # not JSON after the tag: drop it up to the closing tag
                    self._end_call(out)
                    self._closing = True
                    continue
                self._buffer = self._buffer[consumed:]
                if self._call.done:
                    self._end_call(out)
                    self._closing = True
            else:
                start = self._buffer.find(self.OPEN)
                if start < 0:
                    keep = _partial_marker(self._buffer, self.OPEN)
                    self._content(self._buffer[: len(self._buffer) - keep], out)
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return
                self._content(self._buffer[:start], out)
                self._buffer = self._buffer[start + len(self.OPEN) :]
                self._start_call()

    def _flush(self, out: ParsedDelta) -> None:
        if self._call is None and not self._closing:
            self._content(self._buffer, out)
        self._buffer = ""


class _JsonCallsParser(ToolCallParser):
    """Calls as JSON objects after an optional prefix, separated by ``separators``; once
    the calls end, the rest is content."""

    prefix = ""
    separators = ""

    def __init__(self, *, id_prefix: str = "call_") -> None:
        super().__init__(id_prefix=id_prefix)
        self._buffer = ""
        self._in_calls = False
        self._calls_ended = False

    def _parse(self, text: str, out: ParsedDelta) -> None:
        self._buffer += text
        while self._buffer:
            if self._calls_ended:
                self._content(self._buffer, out)
                self._buffer = ""
            elif self._call is not None:
                consumed = self._feed_call(self._buffer, out)
                if consumed < 0:
                    self._end_call(out)
                    self._calls_ended = True
                    continue
                self._buffer = self._buffer[consumed:]
                if self._call.done:
                    self._end_call(out)
            elif self._in_calls:
                rest = self._buffer.lstrip(self.separators + _WHITESPACE)
                self._buffer = rest
                if rest.startswith("{"):
                    self._start_call()
                elif rest:
                    self._calls_ended = True
            elif not self._enter_calls(out):
                return

    @abstractmethod
    def _enter_calls(self, out: ParsedDelta) -> bool:
        """Finds where calls start; False when more text is needed to tell."""

    def _flush(self, out: ParsedDelta) -> None:
        if self._call is None and not self._in_calls:
            self._content(self._buffer, out)
        self._buffer = ""


class Llama3JsonParser(_JsonCallsParser):
    """Llama 3.x: the whole output is calls when it opens with ``{`` (or ``<|python_tag|>``
    when the tokenizer keeps it visible); otherwise it is content."""

    separators = ";"
    _PYTHON_TAG = "<|python_tag|>"

    def _enter_calls(self, out: ParsedDelta) -> bool:
        head = self._buffer.lstrip(_WHITESPACE)
        if not head or (self._PYTHON_TAG.startswith(head) and head != self._PYTHON_TAG):
            return False
        head = head.removeprefix(self._PYTHON_TAG).lstrip(_WHITESPACE)
        if not head:
            return False
        if head.startswith("{"):
            self._buffer = head
            self._in_calls = True
        else:
            self._calls_ended = True
        return True


class MistralParser(_JsonCallsParser):
    """Mistral: content, then ``[TOOL_CALLS]`` and a JSON array of calls."""

    separators = "[,]"
    MARKER = "[TOOL_CALLS]"

    def _enter_calls(self, out: ParsedDelta) -> bool:
        start = self._buffer.find(self.MARKER)
        if start < 0:
            keep = _partial_marker(self._buffer, self.MARKER)
            self._content(self._buffer[: len(self._buffer) - keep], out)
            self._buffer = self._buffer[len(self._buffer) - keep :]
            return False
        self._content(self._buffer[:start], out)
        self._buffer = self._buffer[start + len(self.MARKER) :]
        self._in_calls = True
        return True


def tool_call_parser(format_name: ToolFormat, *, id_prefix: str = "call_") -> ToolCallParser:
    parsers: dict[ToolFormat, type[ToolCallParser]] = {
        "hermes": HermesParser,
        "llama3_json": Llama3JsonParser,
        "mistral": MistralParser,
    }
    return parsers[format_name](id_prefix=id_prefix)


# -- tools, and forcing a call -----------------------------------------------------------------

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(slots=True)
class ToolSpec:
    """A function the model may call: the API-independent view of a tool definition."""

    name: str
    description: str
    parameters: dict[str, Any]

    def template_entry(self) -> dict[str, Any]:
        """The tool as chat templates expect it (OpenAI's shape)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


def check_tools(tools: list[ToolSpec]) -> str | None:
    """What is wrong with a tools list, or None: names must be valid and unique."""
    seen: set[str] = set()
    for position, tool in enumerate(tools):
        if not _TOOL_NAME.match(tool.name):
            return (
                f"tools[{position}]: the name {tool.name!r} must be 1-64 characters of "
                "letters, digits, '_', '.' or '-'"
            )
        if tool.name in seen:
            return f"tools[{position}]: the name {tool.name!r} is used by more than one tool"
        seen.add(tool.name)
    return None


def _call_schema(tool: ToolSpec, arguments_key: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, arguments_key: tool.parameters},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }


def forced_call_grammar(format_name: ToolFormat, tools: list[ToolSpec], *, parallel: bool) -> str:
    """A Lark grammar (llguidance syntax) whose every sentence is one call (or, with
    ``parallel``, one or more calls) of ``tools`` in ``format_name``, with arguments that
    validate against the tool's parameters schema."""
    arguments_key = "parameters" if format_name == "llama3_json" else "arguments"
    schemas = [_call_schema(tool, arguments_key) for tool in tools]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    # Embedded JSON allows any whitespace unless told otherwise, and a model that never
    # stops writing it would never finish the call: fix the separators as the models do.
    schema = {**schema, "x-guidance": _JSON_LAYOUT}
    call_object = "call_object: %json " + json.dumps(schema, separators=(",", ":"))
    if format_name == "hermes":
        call = 'call: "<tool_call>\\n" call_object "\\n</tool_call>"'
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
    elif format_name == "llama3_json":
        call = "call: call_object"
        start = 'start: call ("; " call)*' if parallel else "start: call"
    else:
        call = "call: call_object"
        start = (
            'start: "[TOOL_CALLS][" call (", " call)* "]"'
            if parallel
            else ('start: "[TOOL_CALLS][" call "]"')
        )
    return "\n".join((start, call, call_object)) + "\n"
