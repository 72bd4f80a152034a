"""The gateway's FastAPI application: wiring, lifecycle, health and metrics endpoints.

``create_app(settings)`` loads the model's tokenizer and chat format, follows the
controller's routing table (or a ``routes_source`` given by the caller, such as
:class:`StaticRoutes`), and mounts the OpenAI API and the Anthropic Messages API
(``/v1/messages``) under ``/v1``. ``/health`` is readiness: 200 while a replica can take a
request (READY in the routing table and not found unreachable), 503 otherwise. ``/live`` is
liveness: 200 whenever the process answers, engines or not. ``/metrics`` serves the gateway's
Prometheus registry.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.access import AccessMiddleware
from gateway.admin_routes import build_admin_router
from gateway.admission import Admission
from gateway.anthropic_routes import AnthropicRoutes, build_anthropic_router
from gateway.chat import ChatFormat
from gateway.engine_client import EngineClient
from gateway.errors import install_error_handlers
from gateway.fast_routes import FastRoutes
from gateway.generation import Generator
from gateway.lora_policy import AdapterAffinityPolicy
from gateway.lora_routes import (
    AdapterAdmin,
    AdapterCatalog,
    ControllerAdapterAdmin,
    EnginesAdapterAdmin,
    LoRARoutes,
    build_lora_router,
)
from gateway.metrics import GatewayMetrics, MetricsMiddleware
from gateway.multimodal import ImageSupport
from gateway.openai_routes import OpenAIRoutes, build_openai_router
from gateway.openapi import install_openapi
from gateway.platform_tools import PlatformTools
from gateway.prefix_index import KVEventFollower, PrefixIndex
from gateway.prefix_policy import PrefixAwarePolicy, SessionIdMiddleware
from gateway.quota_setup import build_access_control
from gateway.route_sources import ControllerRoutes
from gateway.routing import (
    LeastLoadPolicy,
    RoundRobinPolicy,
    Router,
    RoutesSource,
    RoutingPolicy,
)
from gateway.tokenization import ModelTokenizer
from switchyard.demo import resolve_model
from switchyard.settings import GatewaySettings

# The generation endpoints, called without FastAPI's per-request machinery.
FAST_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/messages")


def create_app(
    settings: GatewaySettings,
    *,
    routes_source: RoutesSource | None = None,
    policy: RoutingPolicy | None = None,
    fast_routes: bool = True,
) -> FastAPI:
    """Builds the gateway. Blocks while the tokenizer loads (and the demo model, if asked
    for, is built); the routing table is followed once the app starts. ``fast_routes=False``
    routes the generation endpoints through FastAPI too (:mod:`gateway.fast_routes`)."""
    model_path = resolve_model(settings.model, settings.data_dir)
    served_model_name = settings.served_model_name or settings.model
    source = routes_source or ControllerRoutes(
        settings.controller_address, gateway_id=f"gateway-{socket.gethostname()}-{os.getpid()}"
    )
    metrics = GatewayMetrics()
    kv_events: KVEventFollower | None = None
    # Only the prefix policy reads the session id (a policy given by the caller may too);
    # for the others the header would be read on every request for nothing.
    reads_session = policy is not None or settings.routing_policy == "prefix"
    if policy is None:
        if settings.routing_policy == "prefix":
            index = PrefixIndex()
            kv_events = KVEventFollower(index, source.replicas)
            policy = PrefixAwarePolicy(index, settings.prefix_load_guard)
        elif settings.routing_policy == "round_robin":
            policy = RoundRobinPolicy()
        else:
            policy = LeastLoadPolicy()
    # LoRA requests prefer replicas holding their adapter; base requests see the policy.
    router = Router(
        source,
        AdapterAffinityPolicy(policy),
        max_in_flight_per_replica=settings.max_in_flight_per_replica,
    )
    engines = EngineClient(
        router,
        metrics.engine_retries,
        timeout_s=settings.request_timeout_s,
        failover_wait_s=settings.failover_wait_s,
        pd_min_prompt_tokens=settings.pd_min_prompt_tokens,
    )
    tokenizer = ModelTokenizer(model_path)
    chat = ChatFormat(
        tokenizer,
        Path(model_path),
        settings.data_dir,
        chat_format=settings.chat_format,
        tool_call_parser=settings.tool_call_parser,
    )
    access = build_access_control(settings, metrics.registry)
    generator = Generator(tokenizer, router, engines, Admission(settings.max_in_flight_requests))
    platform_tools = PlatformTools(settings, generator, chat, served_model_name, metrics.registry)
    catalog = AdapterCatalog(router, served_model_name)
    images = ImageSupport.from_settings(settings, Path(model_path))
    routes = OpenAIRoutes(
        generator, chat, metrics, served_model_name, settings.max_n, catalog, images
    )
    anthropic_routes = AnthropicRoutes(generator, chat, metrics, served_model_name, catalog, images)
    routes.platform_chat = anthropic_routes.platform_chat = platform_tools.platform_chat()
    adapter_admin: AdapterAdmin = (
        ControllerAdapterAdmin(settings.controller_address)
        if isinstance(source, ControllerRoutes)
        else EnginesAdapterAdmin(router)
    )
    lora_routes = LoRARoutes(
        catalog, adapter_admin, auth_enabled=access.auth_enabled, admin_key=settings.admin_key
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await source.start()
        await access.register_config_keys()
        if kv_events is not None:
            await kv_events.start()
        try:
            async with platform_tools.running():
                yield
        finally:
            if kv_events is not None:
                await kv_events.close()
            await engines.close()
            await adapter_admin.close()
            await source.close()
            tokenizer.close()
            images.close()
            await access.store.close()
            await platform_tools.close()

    app = FastAPI(
        title="Switchyard gateway",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
        # The gateway exports Prometheus metrics and sets up no OpenTelemetry; FastAPI's own
        # would otherwise look for configured providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_openapi(app, served_model_name=served_model_name, with_api_keys=access.auth_enabled)
    install_error_handlers(app)
    openai_router = build_openai_router(routes)
    app.include_router(openai_router)
    anthropic_router = build_anthropic_router(anthropic_routes)
    app.include_router(anthropic_router)
    platform_tools.mount(app)
    lora_router = build_lora_router(lora_routes)
    app.include_router(lora_router)

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = len(router.ready_replicas())
        return JSONResponse(
            {"status": "ok" if ready else "unavailable", "ready_replicas": ready},
            status_code=200 if ready else 503,
        )

    @app.get("/live")
    async def live() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    endpoints = [
        *(getattr(route, "path", "") for route in openai_router.routes),
        *(getattr(route, "path", "") for route in anthropic_router.routes),
        *platform_tools.endpoints(),
        *(getattr(route, "path", "") for route in lora_router.routes),
        "/health",
        "/live",
        "/metrics",
        "/openapi.json",
        "/docs",
    ]
    app.include_router(build_admin_router(access, settings.admin_key))
    if fast_routes:  # innermost: access control and metrics see every request alike
        app.add_middleware(
            FastRoutes,
            fastapi_app=app,
            routers=[openai_router, anthropic_router],
            paths=FAST_PATHS,
        )
    app.add_middleware(AccessMiddleware, control=access)
    if settings.session_header and reads_session:
        app.add_middleware(SessionIdMiddleware, header=settings.session_header)
    # Added last, so it runs first: refused keys are counted too.
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints=endpoints)
    return app
