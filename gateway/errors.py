"""The clients' error formats, for every way a request can fail.

Every failure, from a malformed body to an engine that went away, leaves the gateway with
the matching HTTP status in the format of the API that was called, and the server keeps
serving. FastAPI's own 422 shape never reaches a client.

- OpenAI (every path but the Anthropic one): ``{"error": {"message", "type", "param", "code"}}``
- Anthropic (``/v1/messages``): ``{"type": "error", "error": {"type", "message"}}``, the
  type named by the status (``invalid_request_error``, ``authentication_error``,
  ``not_found_error``, ``overloaded_error``, ``api_error``, ...).

The OpenAI routes raise :class:`OpenAIError`, the Anthropic routes :class:`AnthropicError`
(always Anthropic's format); what fails before a route is chosen (a malformed body, a refused
key, an unknown path) is an :class:`ApiError`, answered in the format of the API its path
belongs to. An error that may
pass if tried later (429, 503) carries ``Retry-After``.
"""

from __future__ import annotations

import logging
from typing import Any, Self

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


ANTHROPIC_PATH = "/v1/messages"

_ANTHROPIC_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def is_anthropic_path(path: str) -> bool:
    return path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")


class ApiError(Exception):
    """A request failure, independent of the API: the HTTP status, a message for the
    client, OpenAI's ``param`` and ``code`` where they apply, and ``retry_after_s`` (sent as
    ``Retry-After``) when trying again later may succeed. Answered in the format of the API
    at the request's path; :class:`AnthropicError` fixes Anthropic's format."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    @classmethod
    def of(cls, error: ApiError) -> Self:
        """``error`` as this class (and so in its format); itself when it already is one."""
        if isinstance(error, cls):
            return error
        return cls(
            error.status,
            error.message,
            type=error.type,
            param=error.param,
            code=error.code,
            retry_after_s=error.retry_after_s,
        )

    def body(self) -> dict[str, Any]:
        """OpenAI's error body."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_body(self) -> dict[str, Any]:
        """Anthropic's error body."""
        error_type = _ANTHROPIC_TYPE_BY_STATUS.get(
            self.status, "api_error" if self.status >= 500 else "invalid_request_error"
        )
        return {"type": "error", "error": {"type": error_type, "message": self.message}}

    def headers(self) -> dict[str, str] | None:
        if self.retry_after_s is None:
            return None
        return {"retry-after": str(self.retry_after_s)}

    def response(self, path: str = "") -> JSONResponse:
        """The error as the API at ``path`` answers it."""
        body = self.anthropic_body() if is_anthropic_path(path) else self.body()
        return JSONResponse(body, status_code=self.status, headers=self.headers())


class OpenAIError(ApiError):
    """A failure of an OpenAI endpoint (and, as before, of the parts that answer any path:
    access control, the admin API, the platform tools), answered in the format of its path."""


class AnthropicError(ApiError):
    """A failure of the Messages API: always answered in Anthropic's format."""

    def response(self, path: str = "") -> JSONResponse:
        return JSONResponse(self.anthropic_body(), status_code=self.status, headers=self.headers())


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _neutral_invalid_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """The first problem in the body, named by its path (``messages.0.role``)."""
    errors = exc.errors()
    if not errors:
        return _neutral_invalid_request("invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return _neutral_invalid_request(
            f"the request body is not valid JSON: {first.get('msg', '')}"
        )
    location = _location(first.get("loc", ()))
    if first.get("type") == "union_tag_invalid":  # messages.0 -> messages.0.role
        location.append(str(first.get("ctx", {}).get("discriminator", "")).strip("'"))
    param = ".".join(location) or None
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing" and param:
        message = f"'{param}' is a required property"
    elif param:
        message = f"{param}: {message}"
    return _neutral_invalid_request(message, param=param)


# Pydantic puts the chosen member of a tagged union into the error's location
# (messages.0.tool.tool_call_id); clients know the field as messages.0.tool_call_id.
_MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def _location(loc: Any) -> list[str]:
    parts = [part for part in loc if part != "body"]
    kept: list[str] = []
    for position, part in enumerate(parts):
        after_message_index = (
            position >= 2
            and isinstance(parts[position - 1], int)
            and parts[position - 2] == "messages"
        )
        if after_message_index and part in _MESSAGE_ROLES:
            continue
        kept.append(str(part))
    return kept


def install_error_handlers(app: FastAPI) -> None:
    """Answers validation errors, HTTP errors and crashes in the called API's format."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return exc.response(request.url.path)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _validation_error(exc).response(request.url.path)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return ApiError(exc.status_code, str(exc.detail)).response(request.url.path)

    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        error = ApiError(500, "internal server error", type="server_error")
        return error.response(request.url.path)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_crash)
