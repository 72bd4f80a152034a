"""The gateway's FastAPI application: wiring, lifecycle, health and metrics endpoints.

``create_app(settings)`` loads the model's tokenizer, follows the controller's routing
table (or a ``routes_source`` given by the caller, such as :class:`StaticRoutes`), and
mounts the OpenAI API under ``/v1``. ``/health`` answers 200 once an engine replica is
READY and 503 before; ``/metrics`` serves the gateway's Prometheus registry.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.auth import ApiKeyAuth, ApiKeyMiddleware, load_api_keys
from gateway.engine_client import EngineClient
from gateway.errors import install_error_handlers
from gateway.generation import Generator
from gateway.metrics import GatewayMetrics, MetricsMiddleware
from gateway.openai_routes import OpenAIRoutes, build_openai_router
from gateway.route_sources import ControllerRoutes
from gateway.routing import LeastLoadPolicy, Router, RoutesSource, RoutingPolicy
from gateway.tokenization import ModelTokenizer
from switchyard.demo import resolve_model
from switchyard.settings import GatewaySettings


def create_app(
    settings: GatewaySettings,
    *,
    routes_source: RoutesSource | None = None,
    policy: RoutingPolicy | None = None,
) -> FastAPI:
    """Builds the gateway. Blocks while the tokenizer loads (and the demo model, if asked
    for, is built); the routing table is followed once the app starts."""
    model_path = resolve_model(settings.model, settings.data_dir)
    served_model_name = settings.served_model_name or settings.model
    source = routes_source or ControllerRoutes(
        settings.controller_address, gateway_id=f"gateway-{socket.gethostname()}-{os.getpid()}"
    )
    metrics = GatewayMetrics()
    router = Router(source, policy or LeastLoadPolicy())
    engines = EngineClient(router, metrics.engine_retries, timeout_s=settings.request_timeout_s)
    tokenizer = ModelTokenizer(model_path)
    auth = ApiKeyAuth(load_api_keys(settings.api_keys, settings.api_key_file))
    routes = OpenAIRoutes(
        Generator(tokenizer, router, engines), metrics, served_model_name, settings.max_n
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await source.start()
        try:
            yield
        finally:
            await engines.close()
            await source.close()
            tokenizer.close()

    app = FastAPI(
        title="Switchyard gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    install_error_handlers(app)
    openai_router = build_openai_router(routes)
    app.include_router(openai_router)

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = len(router.ready_replicas())
        return JSONResponse(
            {"status": "ok" if ready else "unavailable", "ready_replicas": ready},
            status_code=200 if ready else 503,
        )

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    endpoints = [
        *(getattr(route, "path", "") for route in openai_router.routes),
        "/health",
        "/metrics",
    ]
    app.add_middleware(ApiKeyMiddleware, auth=auth, prefix="/v1/")
    # Added last, so it runs first: refused keys are counted too.
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints=endpoints)
    return app
