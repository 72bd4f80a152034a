"""LoRA at the edge: which adapter a request's ``model`` names, the adapters' model cards,
and vLLM's runtime endpoints ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter``.

The adapters the fleet serves are read off the routing table (every replica reports what
it has registered). ``model`` selects an adapter by its name, or SGLang's ``BASE:ADAPTER``;
the base model's own name selects none; anything else is a 404 in the client's format.

Loads and unloads go to the controller, which applies them on every replica (and on
replicas that join later); with a static list of engines (no controller) the gateway
applies them on each engine itself. Either way a bad adapter is refused on the first
replica, with the engine's reason as a 400, before any other replica loads it. The answer
waits, briefly, until the routing table shows the change, so the next request sees it.
When API keys are configured, both endpoints need the admin key.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Protocol

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import AnthropicError, OpenAIError
from gateway.openai_api import ModelCard
from gateway.routing import Router
from switchyard.grpc_utils import insecure_channel
from switchyard.v1 import controller_pb2_grpc, engine_pb2, engine_pb2_grpc

# How long an answer waits for the routing table to show a load or unload.
TABLE_WAIT_S = 10.0
RPC_TIMEOUT_S = 300.0  # a hub download may be slow

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.ALREADY_EXISTS: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class LoadLoRAAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False


class UnloadLoRAAdapter(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM also accepts a lora_int_id

    lora_name: str = Field(min_length=1)


class AdapterCatalog:
    """The adapters the READY replicas serve, and what a request's ``model`` selects."""

    def __init__(self, router: Router, served_model_name: str) -> None:
        self.router = router
        self.served_model_name = served_model_name

    def adapters(self) -> dict[str, str]:
        """Adapter name -> path, over the READY replicas."""
        found: dict[str, str] = {}
        for replica in self.router.ready_replicas():
            for name, path in replica.lora_adapters:
                found.setdefault(name, path)
        return found

    def resolve(self, model: str, *, anthropic: bool = False) -> str:
        """The adapter ``model`` selects ("" for the base model); a 404 if none (worded as
        Anthropic words it for the Messages API)."""
        if model == self.served_model_name:
            return ""
        adapters = self.adapters()
        if model in adapters:
            return model
        base, sep, adapter = model.rpartition(":")
        if sep and base == self.served_model_name and adapter in adapters:
            return adapter
        if anthropic:
            raise AnthropicError(404, f"model: {model}")
        raise OpenAIError(
            404,
            f"The model `{model}` does not exist.",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )

    def cards(self, created: int) -> list[ModelCard]:
        return [
            ModelCard(id=name, created=created, root=path, parent=self.served_model_name)
            for name, path in sorted(self.adapters().items())
        ]


class AdapterAdmin(Protocol):
    """Applies a load or unload to the fleet; raises ``grpc.aio.AioRpcError``."""

    async def load(self, request: engine_pb2.LoadLoRAAdapterRequest) -> None: ...

    async def unload(self, request: engine_pb2.UnloadLoRAAdapterRequest) -> None: ...

    async def close(self) -> None: ...


class ControllerAdapterAdmin:
    """Through the controller, which reaches every replica."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> controller_pb2_grpc.ControllerServiceStub:
        if self._channel is None:
            self._channel = insecure_channel(self._address)
        return controller_pb2_grpc.ControllerServiceStub(self._channel)

    async def load(self, request: engine_pb2.LoadLoRAAdapterRequest) -> None:
        await self._stub().LoadLoRAAdapter(request, timeout=RPC_TIMEOUT_S)

    async def unload(self, request: engine_pb2.UnloadLoRAAdapterRequest) -> None:
        await self._stub().UnloadLoRAAdapter(request, timeout=RPC_TIMEOUT_S)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


class EnginesAdapterAdmin:
    """Straight to each READY engine (a static engine list, no controller): the first one
    validates, then the rest follow."""

    def __init__(self, router: Router) -> None:
        self._router = router

    async def _each(self, call) -> None:  # type: ignore[no-untyped-def]
        replicas = self._router.ready_replicas()
        if not replicas:
            raise OpenAIError(503, "no engine replica is ready")
        first, *rest = replicas
        await self._call(first.address, call)
        await asyncio.gather(*(self._call(r.address, call) for r in rest))

    @staticmethod
    async def _call(address: str, call) -> None:  # type: ignore[no-untyped-def]
        async with insecure_channel(address) as channel:
            await call(engine_pb2_grpc.EngineServiceStub(channel))

    async def load(self, request: engine_pb2.LoadLoRAAdapterRequest) -> None:
        await self._each(lambda stub: stub.LoadLoRAAdapter(request, timeout=RPC_TIMEOUT_S))

    async def unload(self, request: engine_pb2.UnloadLoRAAdapterRequest) -> None:
        await self._each(lambda stub: stub.UnloadLoRAAdapter(request, timeout=RPC_TIMEOUT_S))

    async def close(self) -> None:
        return None


class LoRARoutes:
    def __init__(
        self,
        catalog: AdapterCatalog,
        admin: AdapterAdmin,
        *,
        auth_enabled: bool,
        admin_key: str,
    ) -> None:
        self.catalog = catalog
        self.admin = admin
        self.auth_enabled = auth_enabled
        self._admin_key = admin_key.encode()

    def _check_admin(self, request: Request) -> None:
        if not self.auth_enabled:
            return
        if not self._admin_key:
            raise OpenAIError(
                403, "loading and unloading LoRA adapters needs the admin key; none is configured"
            )
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        token = presented.strip() if scheme.lower() == "bearer" else ""
        token = token or request.headers.get("x-api-key", "").strip()
        if not hmac.compare_digest(token.encode(), self._admin_key):
            raise OpenAIError(
                403, "loading and unloading LoRA adapters needs the admin key",
                code="insufficient_permissions",
            )  # fmt: skip

    async def load(self, body: LoadLoRAAdapter, request: Request) -> PlainTextResponse:
        self._check_admin(request)
        if body.lora_name == self.catalog.served_model_name or ":" in body.lora_name:
            raise OpenAIError(400, f"{body.lora_name!r} cannot name an adapter", param="lora_name")
        message = engine_pb2.LoadLoRAAdapterRequest(
            lora_name=body.lora_name, lora_path=body.lora_path, load_inplace=body.load_inplace
        )
        await _apply(self.admin.load(message))
        await self._await_table(lambda: self.catalog.adapters().get(body.lora_name) is not None)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload(self, body: UnloadLoRAAdapter, request: Request) -> PlainTextResponse:
        self._check_admin(request)
        message = engine_pb2.UnloadLoRAAdapterRequest(lora_name=body.lora_name)
        await _apply(self.admin.unload(message))
        await self._await_table(lambda: body.lora_name not in self.catalog.adapters())
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @staticmethod
    async def _await_table(shown) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + TABLE_WAIT_S
        while not shown() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


async def _apply(call) -> None:  # type: ignore[no-untyped-def]
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        status = _HTTP_STATUS.get(exc.code(), 502)
        raise OpenAIError(status, exc.details() or exc.code().name) from None


def build_lora_router(routes: LoRARoutes) -> APIRouter:
    router = APIRouter(prefix="/v1")
    router.add_api_route("/load_lora_adapter", routes.load, methods=["POST"], response_model=None)
    router.add_api_route(
        "/unload_lora_adapter", routes.unload, methods=["POST"], response_model=None
    )
    return router
