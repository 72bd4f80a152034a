"""API keys: ``Authorization: Bearer KEY`` or ``x-api-key: KEY`` (Anthropic's header),
compared in constant time.

Keys come from the settings and from a file of one key per line (blank lines and ``#``
comments skipped). With no key configured, the gateway is open. The check is ASGI
middleware, so that a request without a valid key is refused before its body is read.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import OpenAIError


def load_api_keys(keys: Iterable[str], key_file: Path | None) -> list[str]:
    """The accepted keys from the settings' list and the optional key file.

    A key file that holds no key raises ``ValueError``: asking for one means asking for
    authentication, and an empty file (a secret that was not mounted) must not open the
    gateway to everyone."""
    accepted = [key.strip() for key in keys if key.strip()]
    if key_file is not None:
        from_file = [
            line.strip()
            for line in key_file.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
        if not from_file:
            raise ValueError(f"the API key file {key_file} holds no API key")
        accepted += from_file
    return accepted


class ApiKeyAuth:
    """Checks a request's Authorization header against the accepted keys."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [key.encode() for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None, api_key: str | None = None) -> None:
        """Raises a 401 ``OpenAIError`` unless a header carries an accepted key: the
        ``Authorization`` header's bearer token, else the ``x-api-key`` header."""
        if not self._keys:
            return
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and presented.strip():
            presented = presented.strip()
        elif api_key and api_key.strip():
            presented = api_key.strip()
        else:
            raise _unauthorized(
                "missing API key: send 'Authorization: Bearer YOUR_KEY' or 'x-api-key: YOUR_KEY'"
            )
        candidate = presented.encode()
        # Compare against every key, so the time taken does not tell which one nearly matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise _unauthorized("incorrect API key provided")


def _unauthorized(message: str) -> OpenAIError:
    return OpenAIError(401, message, type="invalid_request_error", code="invalid_api_key")


class ApiKeyMiddleware:
    """Refuses requests under ``prefix`` (the API routes) that lack an accepted key."""

    def __init__(self, app: ASGIApp, auth: ApiKeyAuth, prefix: str) -> None:
        self._app = app
        self._auth = auth
        self._prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and self._auth.enabled
            and scope["path"].startswith(self._prefix)
        ):
            headers = {
                name: value.decode("latin-1")
                for name, value in scope["headers"]
                if name in (b"authorization", b"x-api-key")
            }
            try:
                self._auth.check(headers.get(b"authorization"), headers.get(b"x-api-key"))
            except OpenAIError as exc:
                await exc.response(scope["path"])(scope, receive, send)
                return
        await self._app(scope, receive, send)
