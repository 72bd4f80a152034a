"""The OpenAI API's shapes: request bodies as validated, responses and stream chunks as sent.

Field bounds here are the API's own (OpenAI's, plus vLLM's sampling extensions as extra
body fields); a body that breaks one is answered 400 in OpenAI's error format. Limits that
depend on the deployment (``n``, the context length) are checked where they are known.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

# -- requests ------------------------------------------------------------------------------

# The engine's wire types (SamplingParams) bound these; a value past them is the caller's error.
_INT32_MAX = (1 << 31) - 1
_UINT32_MAX = (1 << 32) - 1
TokenId = Annotated[int, Field(ge=0, le=_UINT32_MAX)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(BaseModel):
    """vLLM's ``structured_outputs`` extra body field (the kinds Switchyard enforces)."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    grammar: str | None = None
    backend: str | None = None


class SamplingRequest(BaseModel):
    """What chat and completion requests share: the model, sampling and streaming."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = Field(
        default=None,
        # What the validator below enforces, stated in the schema.
        json_schema_extra={
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}},
                {"type": "null"},
            ]
        },
    )
    max_tokens: int | None = Field(default=None, ge=1, le=_UINT32_MAX)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=-(1 << 63), le=(1 << 63) - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extensions, sent by OpenAI clients as extra body fields.
    top_k: int = Field(default=0, ge=-1, le=_INT32_MAX)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=_UINT32_MAX)
    stop_token_ids: list[TokenId] = Field(default_factory=list)
    # Only requests with the same salt share cached prompt prefixes (one per tenant or user).
    cache_salt: str | None = Field(default=None, min_length=1)
    # Output constraints: OpenAI's response_format, vLLM's structured_outputs, and the older
    # guided_* fields that vLLM still accepts.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        # An empty stop sequence would end every sample before its first token.
        if value == "" or (isinstance(value, list) and "" in value):
            raise ValueError("stop sequences must not be empty")
        return value

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")

    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    """A text part, or an ``image_url`` part (``data:`` URLs; http(s) when the gateway
    fetches them) for vision-language models."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class FunctionCallParam(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    arguments: str | dict[str, Any]  # JSON text, as OpenAI sends it; an object is taken too


class ToolCallParam(BaseModel):
    """A call an earlier assistant message made, as the client sends it back."""

    model_config = ConfigDict(extra="allow")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallParam


class _MessageParam(BaseModel):
    """What every message has; extra fields pass through to the chat template."""

    model_config = ConfigDict(extra="allow")

    content: str | list[ContentPart] | None = None
    name: str | None = None


class SystemMessageParam(_MessageParam):
    role: Literal["system"]


class DeveloperMessageParam(_MessageParam):
    role: Literal["developer"]


class UserMessageParam(_MessageParam):
    role: Literal["user"]


class AssistantMessageParam(_MessageParam):
    role: Literal["assistant"]
    tool_calls: list[ToolCallParam] | None = None


class ToolMessageParam(_MessageParam):
    """A tool's answer: ``tool_call_id`` names the call it answers (required, as in OpenAI)."""

    role: Literal["tool"]
    tool_call_id: str


# One message, its shape chosen by ``role`` (OpenAI's ChatCompletionMessageParam).
ChatMessage = Annotated[
    SystemMessageParam
    | DeveloperMessageParam
    | UserMessageParam
    | AssistantMessageParam
    | ToolMessageParam,
    Field(discriminator="role"),
]


class FunctionDefinition(BaseModel):
    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ChatTool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class ChatMcpTool(BaseModel):
    """A platform tool source (``{"type": "mcp", "server_label": ...}``): the gateway runs
    its tools itself (:mod:`gateway.platform_chat`)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["mcp"]
    server_label: str


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class McpToolChoice(BaseModel):
    type: Literal["mcp"]
    server_label: str
    name: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Annotated[ChatTool | ChatMcpTool, Field(discriminator="type")]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | McpToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1, le=_UINT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)

    @property
    def has_platform_tools(self) -> bool:
        return any(tool.type == "mcp" for tool in self.tools or []) or isinstance(
            self.tool_choice, McpToolChoice
        )

    @property
    def output_limit(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    max_tokens: int | None = Field(default=16, ge=1, le=_UINT32_MAX)


# -- responses -----------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "switchyard"
    max_model_len: int | None = None
    # vLLM's: a LoRA adapter's card names its base model (parent) and its path (root).
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    """The reply; ``tool_calls`` and ``reasoning_content`` are sent only when present."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in ("tool_calls", "reasoning_content"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ToolCallChunk(BaseModel):
    """A streamed piece of a tool call: the first has id, type and name, the rest only
    argument fragments (OpenAI's shape)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatDelta(BaseModel):
    """A stream delta: only the fields it carries are sent (``{}`` on the last chunk)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallChunk] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A completion, or (streaming) one chunk of it: OpenAI uses the same object for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, for every status this API answers with."""

    error: ErrorDetail
