"""The served model's way of chatting, shared by the OpenAI and Anthropic APIs.

A :class:`ChatFormat` is fixed when the gateway starts, from the model's chat template,
tokenizer and config (or the ``chat_format`` and ``tool_call_parser`` settings): either the
model's Jinja chat template with one of the text tool-call formats of
:mod:`gateway.tool_calls`, or Harmony (:mod:`gateway.harmony`). It answers the three
questions every chat request asks: which prompt tokens (tools rendered through the
template's ``tools`` argument), which constraint forces the tool call when ``tool_choice``
demands one, and which parser reads the output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gateway.harmony import HarmonyChat, is_harmony_model, load_encoding
from gateway.structured import ConstraintError, check_constraint, make_constraint
from gateway.tokenization import ModelTokenizer
from gateway.tool_calls import (
    OutputParser,
    PlainText,
    ToolFormat,
    ToolSpec,
    check_tools,
    detect_tool_format,
    forced_call_grammar,
    tool_call_parser,
)
from switchyard.v1 import common_pb2


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """Whether the model may, must, or must not call a tool; ``named`` forces ``name``."""

    mode: Literal["none", "auto", "required", "named"]
    name: str | None = None


def check_tool_request(tools: list[ToolSpec], choice: ToolChoice) -> None:
    """Raises ``ConstraintError`` (param ``tools`` or ``tool_choice``) for a malformed tools
    list, a parameters schema the grammar backend cannot enforce, or a choice that names no
    tool or forces a call without tools."""
    problem = check_tools(tools)
    if problem:
        raise ConstraintError(problem, "tools")
    for position, tool in enumerate(tools):
        try:
            check_constraint(
                common_pb2.StructuredOutput(json_schema=json.dumps(tool.parameters)), "tools"
            )
        except ConstraintError as exc:
            raise ConstraintError(
                f"tools[{position}] ({tool.name}) parameters: {exc}", "tools"
            ) from None
    if choice.mode in ("required", "named") and not tools:
        raise ConstraintError(f"tool_choice {choice.mode!r} needs a non-empty tools list", "tools")
    if choice.mode == "named" and choice.name not in {tool.name for tool in tools}:
        raise ConstraintError(
            f"tool_choice names the tool {choice.name!r}, which is not in tools", "tool_choice"
        )


class ChatFormat:
    """Prompt rendering, forced-call constraints and output parsing for the served model."""

    def __init__(
        self,
        tokenizer: ModelTokenizer,
        model_path: Path,
        data_dir: Path,
        *,
        chat_format: Literal["auto", "template", "harmony"] = "auto",
        tool_call_parser: ToolFormat | Literal["auto"] = "auto",
    ) -> None:
        self.tokenizer = tokenizer
        template = tokenizer.chat_template_text()
        use_harmony = chat_format == "harmony" or (
            chat_format == "auto" and is_harmony_model(model_path, template)
        )
        self.harmony = HarmonyChat(load_encoding(data_dir)) if use_harmony else None
        self.tool_format: ToolFormat = (
            detect_tool_format(template, tokenizer.added_vocabulary())
            if tool_call_parser == "auto"
            else tool_call_parser
        )

    async def encode(
        self,
        messages: list[dict[str, Any]],
        tools: list[ToolSpec],
        choice: ToolChoice,
        template_kwargs: dict[str, Any],
        *,
        reasoning_effort: str | None = None,
    ) -> list[int]:
        """The prompt's token ids; tools are left out when ``tool_choice`` is none."""
        offered = [] if choice.mode == "none" else tools
        if self.harmony is not None:
            return self.harmony.render(messages, offered, reasoning_effort=reasoning_effort)
        kwargs = dict(template_kwargs)
        if offered:
            kwargs["tools"] = [tool.template_entry() for tool in offered]
        return await self.tokenizer.encode_chat(messages, kwargs)

    def tool_constraint(
        self, tools: list[ToolSpec], choice: ToolChoice, *, parallel: bool
    ) -> common_pb2.StructuredOutput | None:
        """The grammar that makes the output a call of the forced tool(s), or None."""
        if choice.mode in ("none", "auto"):
            return None
        if self.harmony is not None:
            raise ConstraintError(
                f"tool_choice {choice.mode!r} is not supported for Harmony models; use auto",
                "tool_choice",
            )
        forced = tools if choice.mode == "required" else [t for t in tools if t.name == choice.name]
        grammar = forced_call_grammar(
            self.tool_format, forced, parallel=parallel and choice.mode == "required"
        )
        return make_constraint(grammar=grammar)

    def stop_token_ids(self) -> list[int]:
        return self.harmony.stop_token_ids() if self.harmony is not None else []

    def output_parser(
        self, tools: list[ToolSpec], choice: ToolChoice, *, id_prefix: str = "call_"
    ) -> OutputParser:
        if self.harmony is not None:
            return self.harmony.output_parser(id_prefix=id_prefix)
        if not tools or choice.mode == "none":
            return PlainText()
        return tool_call_parser(self.tool_format, id_prefix=id_prefix)
