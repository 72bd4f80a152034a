"""The Anthropic Messages API's shapes: the request body as validated, the message and the
stream events as sent.

Bounds are the API's own (``temperature`` 0-1, ``max_tokens`` required); a body that breaks
one is answered 400 in Anthropic's error format. Content blocks other than text, tool_use
and tool_result (images, documents, thinking) are refused by the ``type`` discriminator.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# -- requests ------------------------------------------------------------------------------


class TextBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")  # cache_control, citations

    type: Literal["text"]
    text: str


class Base64ImageSource(BaseModel):
    type: Literal["base64"]
    media_type: str
    data: str


class URLImageSource(BaseModel):
    type: Literal["url"]
    url: str


class ImageBlock(BaseModel):
    """An image for a vision-language model: base64 data, or a URL the gateway fetches
    when it is allowed to."""

    model_config = ConfigDict(extra="ignore")  # cache_control

    type: Literal["image"]
    source: Annotated[Base64ImageSource | URLImageSource, Field(discriminator="type")]


class ToolUseBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(block.text for block in self.content)


class McpToolUseBlock(BaseModel):
    """A call the gateway ran on an MCP server (Anthropic's MCP connector), sent back."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["mcp_tool_use"]
    id: str
    name: str
    server_name: str
    input: dict[str, Any]


class McpToolResultBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["mcp_tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(block.text for block in self.content)


ContentBlock = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | McpToolUseBlock | McpToolResultBlock,
    Field(discriminator="type"),
]


class InputMessage(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    description: str = ""
    input_schema: dict[str, Any]


class ToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class McpToolConfiguration(BaseModel):
    enabled: bool | None = None
    allowed_tools: list[str] | None = None


class McpServer(BaseModel):
    """An ``mcp_servers`` entry: a configured server by ``name`` (its label), or one at ``url``
    when the operator allows outbound MCP."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["url"] = "url"
    name: str
    url: str | None = None
    authorization_token: str | None = None
    tool_configuration: McpToolConfiguration | None = None


class Metadata(BaseModel):
    user_id: str | None = None


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int = Field(ge=1, le=(1 << 32) - 1)
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=(1 << 31) - 1)
    stream: bool = False
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None
    mcp_servers: list[McpServer] | None = None

    @property
    def system_text(self) -> str:
        if self.system is None or isinstance(self.system, str):
            return self.system or ""
        return "".join(block.text for block in self.system)


# -- responses -----------------------------------------------------------------------------

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class OutputTextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class OutputToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[OutputTextBlock | OutputToolUseBlock]
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: Usage


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    """Anthropic's error body, for every status this API answers with."""

    type: Literal["error"] = "error"
    error: ErrorDetail
