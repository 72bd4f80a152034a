"""Who may call the API, and how much: key checks, rate limits and budgets as ASGI middleware.

For every request under the guarded prefixes (``/v1/`` and ``/mcp``) the middleware

1. reads the key (``Authorization: Bearer KEY`` or ``x-api-key: KEY``) and hashes it;
2. asks the :class:`~gateway.quota.QuotaStore` to admit it, in one atomic step: an unknown
   or revoked key is a 401, a spent budget a 429 ``insufficient_quota``, a full window or
   too many concurrent requests a 429 ``rate_limit_exceeded``, each with ``Retry-After``;
3. adds the rate-limit headers to the response as it starts (so streamed answers carry them
   too): OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, or Anthropic's
   ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`` on ``/v1/messages``;
4. when the response is done (or the client left), charges the tokens the request spent
   (:mod:`gateway.usage`) and frees its concurrency slot.

With no key configured the gateway is open; default limits then apply to everyone as one
``anonymous`` key. When the store is unreachable, ``fail_open`` decides: admit keys from the
settings and the key file without limits (keys made through the admin API cannot be checked
and are refused with 503), or refuse everything with 503. Either way it is logged.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api_keys import KeyRecord, hash_key
from gateway.errors import OpenAIError, is_anthropic_path
from gateway.quota import Admission, DefaultLimits, QuotaStore, QuotaStoreUnavailable, now_ms
from gateway.usage import UsageMeter, usage_meter

logger = logging.getLogger(__name__)

ANONYMOUS_HASH = hash_key("")
GUARDED_PREFIXES = ("/v1/", "/mcp")
# Guarded by the admin key in their own handlers (gateway/lora_routes.py), not by API keys.
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
UNAVAILABLE_LOG_INTERVAL_S = 10.0


class AccessControl:
    """The policy: which keys exist, the default limits, and what to do without a store."""

    def __init__(
        self,
        store: QuotaStore,
        config_keys: list[KeyRecord],
        defaults: DefaultLimits,
        *,
        auth_enabled: bool,
        fail_open: bool,
        refusals: Counter | None = None,
    ) -> None:
        self.store = store
        self.refusals = refusals
        self.defaults = defaults
        self.auth_enabled = auth_enabled
        self.fail_open = fail_open
        self.config_keys = {record.key_hash: record for record in config_keys}
        if not auth_enabled:
            anonymous = KeyRecord("anonymous", ANONYMOUS_HASH, "anonymous", source="config")
            self.config_keys[ANONYMOUS_HASH] = anonymous
        self._last_unavailable_log = 0.0

    @property
    def limits_enabled(self) -> bool:
        defaults = self.defaults
        return self.auth_enabled or bool(defaults.rpm or defaults.tpm or defaults.concurrent)

    async def register_config_keys(self) -> None:
        """Writes the settings' keys into the store (idempotent; a revoked key stays
        revoked). Failure is logged; admission registers a missing key again."""
        try:
            for record in self.config_keys.values():
                await self.store.put_key(record)
        except QuotaStoreUnavailable as exc:
            self.log_unavailable(exc)

    def count_refusal(self, reason: str) -> None:
        if self.refusals is not None:
            self.refusals.labels(reason).inc()

    def log_unavailable(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_unavailable_log >= UNAVAILABLE_LOG_INTERVAL_S:
            self._last_unavailable_log = now
            logger.warning(
                "rate-limit store unavailable; failing %s",
                "open" if self.fail_open else "closed",
                extra={"error": str(exc)},
            )

    async def admit(self, key_hash: str, request_id: str) -> Admission:
        """The store's decision; a config key the store does not know yet is registered and
        asked again. Raises ``QuotaStoreUnavailable`` when the store cannot answer."""
        admission = await self.store.admit(key_hash, request_id, self.defaults, now_ms())
        if admission.status == "unknown" and key_hash in self.config_keys:
            await self.store.put_key(self.config_keys[key_hash])
            admission = await self.store.admit(key_hash, request_id, self.defaults, now_ms())
        return admission

    def is_config_key(self, key_hash: str) -> bool:
        # Constant-time against every configured hash, like the key check it stands in for.
        matched = False
        for known in self.config_keys:
            matched |= hmac.compare_digest(known, key_hash)
        return matched


def presented_key(scope: Scope) -> str | None:
    """The key of ``Authorization: Bearer`` or else ``x-api-key``; None when neither."""
    authorization = api_key = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"x-api-key":
            api_key = value.decode("latin-1")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if api_key and api_key.strip():
        return api_key.strip()
    return None


def _reset_duration(ms: int) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``250ms``."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = math.ceil(ms / 1000)
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def _reset_time(ms: int) -> str:
    return datetime.fromtimestamp(time.time() + ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rate_limit_headers(admission: Admission, anthropic: bool) -> list[tuple[bytes, bytes]]:
    """The headers that tell the client where it stands; limits of 0 (unlimited) are left
    out."""
    headers: list[tuple[str, str]] = []
    for kind, limit, remaining, reset_ms in (
        ("requests", admission.rpm, admission.remaining_requests, admission.reset_requests_ms),
        ("tokens", admission.tpm, admission.remaining_tokens, admission.reset_tokens_ms),
    ):
        if limit <= 0:
            continue
        if anthropic:
            headers += [
                (f"anthropic-ratelimit-{kind}-limit", str(limit)),
                (f"anthropic-ratelimit-{kind}-remaining", str(remaining)),
                (f"anthropic-ratelimit-{kind}-reset", _reset_time(reset_ms)),
            ]
        else:
            headers += [
                (f"x-ratelimit-limit-{kind}", str(limit)),
                (f"x-ratelimit-remaining-{kind}", str(remaining)),
                (f"x-ratelimit-reset-{kind}", _reset_duration(reset_ms)),
            ]
    return [(name.encode(), value.encode()) for name, value in headers]


def refusal(admission: Admission) -> OpenAIError | None:
    """The error a refused admission is answered with; None when it was admitted."""
    status = admission.status
    if status == "ok":
        return None
    if status == "unknown":
        return OpenAIError(
            401, "incorrect API key provided", type="invalid_request_error", code="invalid_api_key"
        )
    if status == "revoked":
        return OpenAIError(
            401,
            "this API key has been revoked",
            type="invalid_request_error",
            code="invalid_api_key",
        )
    if status == "budget":
        return OpenAIError(
            429,
            "this API key has spent its token budget",
            type="insufficient_quota",
            code="insufficient_quota",
        )
    what = {
        "requests": f"requests per minute ({admission.rpm})",
        "tokens": f"tokens per minute ({admission.tpm})",
        "concurrent": "concurrent requests",
    }[status]
    seconds = math.ceil(admission.retry_after_ms / 1000)
    return OpenAIError(
        429,
        f"rate limit reached for {what}; retry in {seconds} s",
        type=status if status in ("requests", "tokens") else "rate_limit_error",
        code="rate_limit_exceeded",
    )


class AccessMiddleware:
    """Applies an :class:`AccessControl` to the guarded paths (see the module docstring)."""

    def __init__(self, app: ASGIApp, control: AccessControl) -> None:
        self._app = app
        self._control = control

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        control = self._control
        if (
            scope["type"] != "http"
            or not scope["path"].startswith(GUARDED_PREFIXES)
            or scope["path"] in ADMIN_PATHS
            or not control.limits_enabled
        ):
            # Nothing to do before or after: the app's own awaitable, with no coroutine of
            # this middleware around it (resumed whenever the request's task wakes).
            return self._app(scope, receive, send)
        return self._guarded(scope, receive, send)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        control = self._control
        path = scope["path"]
        key = presented_key(scope)
        if control.auth_enabled and key is None:
            error = OpenAIError(
                401,
                "missing API key: send 'Authorization: Bearer YOUR_KEY' or 'x-api-key: YOUR_KEY'",
                type="invalid_request_error",
                code="invalid_api_key",
            )
            control.count_refusal("missing_key")
            await _send_error(error, path, [(b"www-authenticate", b"Bearer")], scope, receive, send)
            return
        key_hash = hash_key(key) if control.auth_enabled and key is not None else ANONYMOUS_HASH
        request_id = uuid.uuid4().hex
        try:
            admission: Admission | None = await control.admit(key_hash, request_id)
        except QuotaStoreUnavailable as exc:
            control.log_unavailable(exc)
            if not (control.fail_open and control.is_config_key(key_hash)):
                error = OpenAIError(
                    503, "the rate-limit store is unavailable", code="rate_limit_store_unavailable"
                )
                control.count_refusal("store_unavailable")
                await _send_error(error, path, [], scope, receive, send)
                return
            admission = None  # fail open: admitted, not counted
        if admission is not None:
            error = refusal(admission)
            if error is not None:
                control.count_refusal(admission.status)
                extra = []
                if admission.retry_after_ms:
                    retry_s = math.ceil(admission.retry_after_ms / 1000)
                    extra += [
                        (b"retry-after", str(retry_s).encode()),
                        (b"retry-after-ms", str(admission.retry_after_ms).encode()),
                    ]
                if error.status == 429:
                    extra += rate_limit_headers(admission, is_anthropic_path(path))
                elif error.status == 401:
                    extra.append((b"www-authenticate", b"Bearer"))
                await _send_error(error, path, extra, scope, receive, send)
                return
        headers = rate_limit_headers(admission, is_anthropic_path(path)) if admission else []

        def send_with_headers(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start" and headers:
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            return send(message)

        meter = UsageMeter()
        token = usage_meter.set(meter)
        try:
            await self._app(scope, receive, send_with_headers)
        finally:
            usage_meter.reset(token)
            if admission is not None:
                await asyncio.shield(self._settle(admission.key_id, meter.total))

    async def _settle(self, key_id: str, tokens: int) -> None:
        try:
            await self._control.store.settle(key_id, tokens, now_ms())
        except QuotaStoreUnavailable as exc:
            self._control.log_unavailable(exc)


async def _send_error(
    error: OpenAIError,
    path: str,
    headers: list[tuple[bytes, bytes]],
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    response = error.response(path)
    response.raw_headers.extend(headers)
    await response(scope, receive, send)
