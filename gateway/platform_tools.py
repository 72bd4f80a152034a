"""The gateway's tool-facing parts, built from its settings and wired into the app in one
place: the tool-service client, the ``/mcp`` endpoint (when a tool service is configured),
``/v1/responses`` and the store of its responses."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter
from starlette.routing import Route

from gateway.chat import ChatFormat
from gateway.generation import Generator
from gateway.mcp_endpoint import MCP_PATH, McpEndpoint
from gateway.platform_chat import PlatformChat
from gateway.response_store import MemoryResponseStore, RedisResponseStore, ResponseStore
from gateway.responses_routes import ResponsesRoutes, build_responses_router
from gateway.tool_client import ToolClient
from switchyard.settings import GatewaySettings


class PlatformTools:
    def __init__(
        self,
        settings: GatewaySettings,
        generator: Generator,
        chat: ChatFormat,
        served_model_name: str,
        registry: CollectorRegistry | None = None,
    ) -> None:
        tool_calls = (
            Counter(
                "switchyard_gateway_tool_calls",
                "MCP and platform tool calls the gateway ran in tool loops, by server label "
                "and outcome (completed, failed)",
                ["server_label", "outcome"],
                registry=registry,
            )
            if registry is not None
            else None
        )
        self.tools = (
            ToolClient(settings.tool_service_address, settings.tool_timeout_s)
            if settings.tool_service_address
            else None
        )
        self.mcp = McpEndpoint(self.tools) if self.tools is not None else None
        self.store: ResponseStore = (
            RedisResponseStore(settings.redis_url, settings.response_ttl_s)
            if settings.redis_url
            else MemoryResponseStore(settings.response_ttl_s)
        )
        self.responses = ResponsesRoutes(
            generator,
            chat,
            served_model_name,
            self.tools,
            self.store,
            allow_outbound_mcp=settings.allow_outbound_mcp,
            max_iterations=settings.max_tool_iterations,
            tool_calls=tool_calls,
        )

    def platform_chat(self) -> PlatformChat | None:
        """The handler of chat and Messages requests naming platform tools; None without a
        tool service."""
        return PlatformChat(self.responses) if self.tools is not None else None

    def mount(self, app: FastAPI) -> None:
        app.include_router(build_responses_router(self.responses))
        if self.mcp is not None:
            app.router.routes.append(
                Route(MCP_PATH, endpoint=self.mcp.asgi, methods=["GET", "POST", "DELETE"])
            )

    def endpoints(self) -> list[str]:
        """Paths the metrics label by name."""
        return ["/v1/responses", "/v1/responses/{response_id}", "/admin/keys", MCP_PATH]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        if self.mcp is None:
            yield
            return
        async with self.mcp.running():
            yield

    async def close(self) -> None:
        if self.tools is not None:
            await self.tools.close()
        await self.store.close()
