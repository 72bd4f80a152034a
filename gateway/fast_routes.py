"""The generation routes, called without FastAPI's per-request machinery.

FastAPI spent 100-200 µs of every request between the app's entry and the handler on a busy
two-core host (measured with ``bench/gateway_hop.py`` and per-stage timestamps): the
router's match over every route, the request/response wrapper with its exit stacks, the
dependency solver, the content-type parse. For a few POST routes whose handler takes one
JSON body model and the ``Request`` (``/v1/completions``, ``/v1/chat/completions``,
``/v1/messages``), :class:`FastRoutes` does only what those routes need, with FastAPI's own
parts, so that what a client sees cannot differ:

- the body is read, parsed with ``json.loads`` (as FastAPI's ``Request.json``; ``orjson``
  would read integers past 64 bits as floats) and validated by the route's own body field
  (FastAPI's ``ModelField``), as FastAPI's ``request_body_to_args`` validates a lone body
  that is not embedded;
- the handler is called with the validated model and a ``Request``, and its ``Response`` is
  sent; an exception is answered as Starlette's ``ExceptionMiddleware`` answers it on the
  routed path, with the app's own handlers, looked up the same way (a 500 is left to the
  app's outermost handler, as there), but without its two coroutines around the handler and
  one more around every ``send``: each is resumed whenever the request's task wakes, for
  every token of a stream.

Anything else takes FastAPI's path, with the body (when it was read) handed back as it came:
another path or method, a content type other than ``application/json``, a body that is not
JSON or fails validation (so that the error is FastAPI's own, word for word), a
``root_path``, a body size limit. It sits inside the access and metrics middleware, which
see every request the same either way.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Mapping
from typing import Any

from fastapi import APIRouter, FastAPI, params
from fastapi.routing import APIRoute
from starlette._utils import is_async_callable
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_JSON = b"application/json"


class _Endpoint:
    """One route's handler, called with its validated body (see the module docstring)."""

    def __init__(self, route: APIRoute) -> None:
        dependant = route.dependant
        assert dependant.call is not None and dependant.request_param_name is not None
        self.call = dependant.call
        self.body_field = dependant.body_params[0]
        self.body_name = self.body_field.name
        self.request_name = dependant.request_param_name


def eligible(route: Any) -> bool:
    """Whether ``route`` can be called directly: a POST route whose handler takes exactly one
    JSON body model (not embedded) and the ``Request``, no other parameter or dependency, and
    returns a ``Response`` itself (no response model to validate or serialize)."""
    if not isinstance(route, APIRoute) or set(route.methods or ()) != {"POST"}:
        return False
    dependant = route.dependant
    return (
        len(dependant.body_params) == 1
        and getattr(route, "_embed_body_fields", True) is False
        and not isinstance(dependant.body_params[0].field_info, params.Form)
        and dependant.request_param_name is not None
        and not dependant.path_params
        and not dependant.query_params
        and not dependant.header_params
        and not dependant.cookie_params
        and not dependant.dependencies
        and not dependant.http_connection_param_name
        and not dependant.websocket_param_name
        and not dependant.response_param_name
        and not dependant.background_tasks_param_name
        and not dependant.security_scopes_param_name
        and route.response_field is None
        and not route.dependencies
        and "{" not in route.path
    )


class FastRoutes:
    """ASGI middleware: the eligible routes at ``paths`` among ``routers`` (included in
    ``fastapi_app`` as they are: no prefix, no dependencies) called directly (see the module
    docstring); every other request passes to the wrapped app untouched."""

    def __init__(
        self,
        app: ASGIApp,
        fastapi_app: FastAPI,
        routers: list[APIRouter],
        paths: tuple[str, ...],
    ) -> None:
        self._app = app
        routes = {
            route.path: route
            for router in routers
            for route in router.routes
            if isinstance(route, APIRoute) and route.path in paths and eligible(route)
        }
        # The handlers Starlette's ExceptionMiddleware gets; 500 and Exception go to the
        # outermost ServerErrorMiddleware, as Starlette's own middleware stack does. The
        # middleware splits them by status code and exception class, with its defaults.
        handlers: Mapping[Any, Any] = {
            key: handler
            for key, handler in fastapi_app.exception_handlers.items()
            if key not in (500, Exception)
        }
        split = ExceptionMiddleware(self._app, handlers=handlers)
        self._exception_handlers: dict[Any, Any] = split._exception_handlers
        self._status_handlers: dict[int, Any] = split._status_handlers
        self._routes = {path: _Endpoint(route) for path, route in routes.items()}

    def paths(self) -> set[str]:
        """The paths taken directly (for tests: a FastAPI upgrade may make a route
        ineligible, which is safe but slower)."""
        return set(self._routes)

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        entry = self._routes.get(scope["path"]) if scope["type"] == "http" else None
        if (
            entry is None
            or scope["method"] != "POST"
            or scope.get("root_path")
            or MAX_BODY_SIZE_SCOPE_KEY in scope  # a body limit: FastAPI enforces and words it
        ):
            # The app's own awaitable, with no coroutine of this middleware around it.
            return self._app(scope, receive, send)
        return self._direct(entry, scope, receive, send)

    async def _direct(self, entry: _Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        """Reads and validates the body; calls the handler with it, or hands the request
        with its body to FastAPI (see the module docstring)."""
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                read = {"type": "http.request", "body": b"".join(chunks), "more_body": True}
                await self._app(scope, _replay([read, message], receive), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        value = self._validated(entry, scope, body)
        if value is None:
            replayed = {"type": "http.request", "body": body, "more_body": False}
            await self._app(scope, _replay([replayed], receive), send)
            return
        # The handler and its response, exceptions answered as Starlette's
        # wrap_app_handling_exceptions answers them (in this coroutine: it is resumed
        # whenever the request's task wakes, and one more would be too).
        endpoint, body = entry, value
        scope["starlette.exception_handlers"] = (self._exception_handlers, self._status_handlers)
        started = False

        def sender(message: Message) -> Awaitable[None]:
            # A plain function handing back send's own awaitable: no coroutine per message.
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            return send(message)

        try:
            request = Request(scope, receive, sender)
            response = await endpoint.call(
                **{endpoint.body_name: body, endpoint.request_name: request}
            )
            if not isinstance(response, Response):  # eligibility says it always is
                raise TypeError(
                    f"{endpoint.call!r} returned {type(response).__name__}, not a Response"
                )
            await response(scope, receive, sender)
        except Exception as exc:
            handler = None
            if isinstance(exc, HTTPException):
                handler = self._status_handlers.get(exc.status_code)
            if handler is None:
                handler = next(
                    (
                        self._exception_handlers[cls]
                        for cls in type(exc).__mro__
                        if cls in self._exception_handlers
                    ),
                    None,
                )
            if handler is None:
                raise
            if started:
                raise RuntimeError(
                    "Caught handled exception, but response already started."
                ) from exc
            conn = Request(scope, receive, send)
            if is_async_callable(handler):
                answer = await handler(conn, exc)
            else:
                answer = await run_in_threadpool(handler, conn, exc)
            if answer is not None:
                await answer(scope, receive, sender)

    @staticmethod
    def _validated(endpoint: _Endpoint, scope: Scope, body: bytes) -> Any:
        """The body as the route's model, or None where FastAPI should answer it itself."""
        content_type = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                if content_type is not None:
                    return None  # two of them: whatever FastAPI makes of it
                content_type = value
        if content_type is None or content_type.lower() != _JSON or not body:
            return None
        try:
            parsed = json.loads(body)
        except ValueError:
            return None
        # What request_body_to_args does for one body field that is not embedded.
        value, errors = endpoint.body_field.validate(parsed, {}, loc=("body",))
        if errors:
            return None
        return value


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` with ``messages`` given back first."""
    pending = list(messages)

    async def replaying() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replaying
