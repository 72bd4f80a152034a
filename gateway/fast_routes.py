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
  sent; exceptions go through Starlette's ``ExceptionMiddleware`` with the app's own
  handlers, as on the routed path (a 500 is left to the app's outermost handler, as there).

Anything else takes FastAPI's path, with the body (when it was read) handed back as it came:
another path or method, a content type other than ``application/json``, a body that is not
JSON or fails validation (so that the error is FastAPI's own, word for word), a
``root_path``, a body size limit. It sits inside the access and metrics middleware, which
see every request the same either way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, FastAPI, params
from fastapi.routing import APIRoute
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_JSON = b"application/json"


class _Endpoint:
    """One route's handler as a plain ASGI app, given its validated body in the scope."""

    def __init__(self, route: APIRoute) -> None:
        dependant = route.dependant
        assert dependant.call is not None and dependant.request_param_name is not None
        self.call = dependant.call
        self.body_field = dependant.body_params[0]
        self.body_name = self.body_field.name
        self.request_name = dependant.request_param_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        arguments = {self.body_name: scope["switchyard.body"], self.request_name: request}
        response = await self.call(**arguments)
        if not isinstance(response, Response):  # eligibility says it always is
            raise TypeError(f"{self.call!r} returned {type(response).__name__}, not a Response")
        await response(scope, receive, send)


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
        # outermost ServerErrorMiddleware, as Starlette's own middleware stack does.
        handlers: Mapping[Any, Any] = {
            key: handler
            for key, handler in fastapi_app.exception_handlers.items()
            if key not in (500, Exception)
        }
        self._routes = {
            path: (_Endpoint(route), ExceptionMiddleware(_Endpoint(route), handlers=handlers))
            for path, route in routes.items()
        }

    def paths(self) -> set[str]:
        """The paths taken directly (for tests: a FastAPI upgrade may make a route
        ineligible, which is safe but slower)."""
        return set(self._routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        entry = self._routes.get(scope["path"]) if scope["type"] == "http" else None
        if (
            entry is None
            or scope["method"] != "POST"
            or scope.get("root_path")
            or MAX_BODY_SIZE_SCOPE_KEY in scope  # a body limit: FastAPI enforces and words it
        ):
            await self._app(scope, receive, send)
            return
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
        value = self._validated(entry[0], scope, body)
        if value is None:
            replayed = {"type": "http.request", "body": body, "more_body": False}
            await self._app(scope, _replay([replayed], receive), send)
            return
        scope["switchyard.body"] = value
        await entry[1](scope, receive, send)

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
