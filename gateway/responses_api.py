"""The shapes of OpenAI's Responses API (``POST /v1/responses``) as the gateway accepts them.

Output items and stream events are built as plain dicts in :mod:`gateway.responses_loop`,
in the shapes the ``openai`` client parses.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class InputContent(_Open):
    type: str
    text: str | None = None


class MessageItem(_Open):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputContent]


class FunctionCallItem(_Open):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Open):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputContent]


class McpCallItem(_Open):
    type: Literal["mcp_call"]
    id: str = ""
    server_label: str
    name: str
    arguments: str
    output: str | None = None
    error: str | None = None


class McpApprovalResponseItem(_Open):
    type: Literal["mcp_approval_response"]
    approval_request_id: str
    approve: bool


class OtherItem(_Open):
    """Items that carry nothing for the model (``mcp_list_tools``, ``reasoning``,
    ``mcp_approval_request``): accepted and skipped when the prompt is built."""

    type: Literal["mcp_list_tools", "reasoning", "mcp_approval_request"]


InputItem = Annotated[
    MessageItem
    | FunctionCallItem
    | FunctionCallOutputItem
    | McpCallItem
    | McpApprovalResponseItem
    | OtherItem,
    Field(discriminator="type"),
]


class FunctionTool(_Open):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class AllowedToolsFilter(_Open):
    tool_names: list[str] | None = None


class McpTool(_Open):
    type: Literal["mcp"]
    server_label: str
    server_url: str | None = None
    server_description: str | None = None
    allowed_tools: list[str] | AllowedToolsFilter | None = None
    require_approval: Literal["always", "never"] | dict[str, Any] | None = None
    headers: dict[str, str] | None = None

    def allowed_names(self) -> set[str] | None:
        if self.allowed_tools is None:
            return None
        if isinstance(self.allowed_tools, list):
            return set(self.allowed_tools)
        return set(self.allowed_tools.tool_names or [])


Tool = Annotated[FunctionTool | McpTool, Field(discriminator="type")]


class FunctionChoice(_Open):
    type: Literal["function"]
    name: str


class McpChoice(_Open):
    type: Literal["mcp"]
    server_label: str
    name: str | None = None


class TextFormat(_Open):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Open):
    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    """A ``POST /v1/responses`` body (the fields Switchyard acts on; others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[Tool] = Field(default_factory=list)
    tool_choice: (
        Literal["none", "auto", "required"]
        | Annotated[FunctionChoice | McpChoice, Field(discriminator="type")]
        | None
    ) = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    max_tool_calls: int | None = Field(default=None, ge=0)
    parallel_tool_calls: bool = True
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    text: TextConfig | None = None
    stream: bool = False
    store: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    seed: int | None = None  # an extension, as vLLM accepts it

    @field_validator("input", mode="before")
    @classmethod
    def _easy_messages(cls, value: Any) -> Any:
        """``{"role", "content"}`` without a type is a message (OpenAI's easy input)."""
        if isinstance(value, list):
            return [
                {**item, "type": "message"}
                if isinstance(item, dict) and "type" not in item and "role" in item
                else item
                for item in value
            ]
        return value
