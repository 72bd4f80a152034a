"""Tool-call parsers read each format whole and streamed in pieces alike; format detection
follows the chat template; the forced-call grammar accepts exactly the calls the parser
reads."""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import pytest
from transformers import PreTrainedTokenizerBase

from gateway.tool_calls import (
    ParsedDelta,
    ToolFormat,
    ToolSpec,
    check_tools,
    detect_tool_format,
    forced_call_grammar,
    tool_call_parser,
)

WEATHER = ToolSpec(
    "get_weather",
    "Weather in a city",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "unit": {"enum": ["c", "f"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
)
TIME = ToolSpec("get_time", "", {"type": "object", "properties": {}})

OUTPUTS: dict[ToolFormat, str] = {
    "hermes": (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "c"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n'
        "</tool_call>"
    ),
    "llama3_json": (
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}; '
        '{"name": "get_time", "parameters": {}}'
    ),
    "mistral": (
        'Let me check.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "c"}}, {"name": "get_time", "arguments": {}}]'
    ),
}


def parse(format_name: ToolFormat, text: str, step: int) -> ParsedDelta:
    parser = tool_call_parser(format_name)
    parsed = ParsedDelta()
    for start in range(0, len(text), step):
        parsed.extend(parser.feed(text[start : start + step], []))
    parsed.extend(parser.finish())
    return parsed


def calls(parsed: ParsedDelta) -> list[tuple[str, dict[str, object]]]:
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for part in parsed.tool_calls:
        if part.id is not None:
            assert part.arguments == "" and part.name
            names[part.index] = part.name
            arguments[part.index] = ""
        else:
            arguments[part.index] += part.arguments
    return [(names[index], json.loads(arguments[index])) for index in sorted(names)]


@pytest.mark.parametrize("format_name", ["hermes", "llama3_json", "mistral"])
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_parser_reads_calls_whole_and_streamed_alike(format_name: ToolFormat, step: int) -> None:
    parsed = parse(format_name, OUTPUTS[format_name], step)
    assert calls(parsed) == [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {})]
    assert parsed.content == ("" if format_name == "llama3_json" else "Let me check.")


@pytest.mark.parametrize("format_name", ["hermes", "llama3_json", "mistral"])
def test_first_delta_of_a_call_has_id_and_name_before_any_argument(
    format_name: ToolFormat,
) -> None:
    parsed = parse(format_name, OUTPUTS[format_name], 2)
    first = parsed.tool_calls[0]
    assert first.id is not None and first.id.startswith("call_") and len(first.id) == 29
    assert (first.name, first.arguments) == ("get_weather", "")
    fragments = [part for part in parsed.tool_calls if part.index == 0 and part.id is None]
    assert len(fragments) > 1, "arguments must stream in fragments, not arrive at the end"


def test_braces_and_quotes_inside_strings_do_not_end_the_arguments() -> None:
    text = (
        '<tool_call>{"name": "f", "arguments": {"s": "} \\" ]", "n": [1, {"x": "{"}]}}</tool_call>'
    )
    parsed = parse("hermes", text, 1)
    assert calls(parsed) == [("f", {"s": '} " ]', "n": [1, {"x": "{"}]})]


def test_content_without_calls_passes_through_including_partial_markers() -> None:
    for format_name, text in (
        ("hermes", "a <tool_ b <tool_call"),
        ("mistral", "a [TOOL_ b [TOOL_CALLS"),
        ("llama3_json", "Hello {world}"),
    ):
        parsed = parse(format_name, text, 1)  # type: ignore[arg-type]
        assert (parsed.content, parsed.tool_calls) == (text, [])


def test_whitespace_before_a_call_is_not_content() -> None:
    parsed = parse("hermes", '\n\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n', 1)
    assert parsed.content == "" and calls(parsed) == [("f", {})]


def test_llama3_object_without_a_name_is_content() -> None:
    parsed = parse("llama3_json", '{"answer": 42}', 2)
    assert parsed.content == '{"answer": 42}' and parsed.tool_calls == []


def test_name_after_arguments_still_streams_the_arguments() -> None:
    parsed = parse("hermes", '<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>', 1)
    assert calls(parsed) == [("f", {"a": 1})]


def test_format_detection_prefers_the_template_over_special_tokens() -> None:
    assert detect_tool_format("{{ '<tool_call>' }}", {"<|python_tag|>"}) == "hermes"
    assert detect_tool_format("{{ '[TOOL_CALLS]' }}", set()) == "mistral"
    assert detect_tool_format('"parameters": dictionary', set()) == "llama3_json"
    assert detect_tool_format("plain", {"<|python_tag|>"}) == "llama3_json"
    assert detect_tool_format("plain", set()) == "hermes"


def test_check_tools_rejects_bad_and_duplicate_names() -> None:
    assert check_tools([WEATHER, TIME]) is None
    assert "more than one" in (check_tools([WEATHER, WEATHER]) or "")
    assert "must be 1-64" in (check_tools([ToolSpec("bad name", "", {})]) or "")


@pytest.fixture(scope="module")
def ll_tokenizer(tokenizer: PreTrainedTokenizerBase) -> llguidance.LLTokenizer:
    return llguidance.hf.from_tokenizer(tokenizer)


def accepts(
    ll_tokenizer: llguidance.LLTokenizer,
    tokenizer: PreTrainedTokenizerBase,
    grammar: str,
    text: str,
) -> bool:
    matcher = llguidance.LLMatcher(ll_tokenizer, llguidance.grammar_from("lark", grammar))
    assert not matcher.is_error(), matcher.get_error()
    tokens = tokenizer.encode(text, add_special_tokens=False)
    return matcher.consume_tokens(tokens) and matcher.is_accepting()


@pytest.mark.parametrize("format_name", ["hermes", "llama3_json", "mistral"])
def test_forced_grammar_accepts_the_formats_calls_and_nothing_else(
    format_name: ToolFormat,
    ll_tokenizer: llguidance.LLTokenizer,
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    key = "parameters" if format_name == "llama3_json" else "arguments"
    call = json.dumps({"name": "get_weather", key: {"city": "Paris", "unit": "c"}})
    wrapped = {
        "hermes": f"<tool_call>\n{call}\n</tool_call>",
        "llama3_json": call,
        "mistral": f"[TOOL_CALLS][{call}]",
    }[format_name]
    grammar = forced_call_grammar(format_name, [WEATHER, TIME], parallel=False)
    assert accepts(ll_tokenizer, tokenizer, grammar, wrapped)
    assert not accepts(ll_tokenizer, tokenizer, grammar, wrapped.replace('"c"', '"k"'))
    assert not accepts(ll_tokenizer, tokenizer, grammar, wrapped.replace(": ", ":  "))
    parsed = parse(format_name, wrapped, 4)
    assert calls(parsed) == [("get_weather", {"city": "Paris", "unit": "c"})]


def test_forced_grammars_compile() -> None:
    for format_name in ("hermes", "llama3_json", "mistral"):
        for parallel in (False, True):
            grammar = forced_call_grammar(format_name, [WEATHER, TIME], parallel=parallel)  # type: ignore[arg-type]
            problem = llguidance.LLMatcher.validate_grammar(
                llguidance.grammar_from("lark", grammar)
            )
            assert problem == "", problem
