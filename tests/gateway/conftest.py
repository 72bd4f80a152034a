"""Fixtures for the gateway's tests: a small checkpoint with a real byte-level BPE tokenizer,
a background event loop, the real engine service on it, and the gateway served by uvicorn."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvicorn
from fastapi import FastAPI
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine_service.server import EngineServer
from gateway.app import create_app
from gateway.http_protocol import GatewayHttpProtocol
from gateway.routing import RoutesSource, RoutingPolicy
from switchyard.demo import make_test_checkpoint
from switchyard.settings import EngineSettings, GatewaySettings
from tests.support import BackgroundLoop

T = TypeVar("T")

MODEL_NAME = "tiny"
MAX_MODEL_LEN = 256


class ServedApp:
    """A FastAPI app served by uvicorn on a free loopback port of a background loop, with the
    gateway's own HTTP protocol (as ``python -m gateway`` serves it)."""

    def __init__(self, app: FastAPI, background: BackgroundLoop) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._background = background
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            http=GatewayHttpProtocol,
            log_level="warning",
            lifespan="on",
        )
        self._server = uvicorn.Server(config)
        self._task = background.run(self._start())

    async def _start(self) -> asyncio.Task[None]:
        task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        return task

    def close(self) -> None:
        async def stop() -> None:
            self._server.should_exit = True
            await self._task

        self._background.run(stop())


def gateway_settings(checkpoint: Path, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = dict(
        model=str(checkpoint),
        served_model_name=MODEL_NAME,
        host="127.0.0.1",
        data_dir=checkpoint.parent,
    )
    values.update(overrides)
    return GatewaySettings(**values)


def serve_gateway(
    background: BackgroundLoop,
    checkpoint: Path,
    routes_source: RoutesSource,
    policy: RoutingPolicy | None = None,
    fast_routes: bool = True,
    **overrides: Any,
) -> ServedApp:
    """Builds the app inside the background loop (gRPC channels bind to the loop they are
    made in) and serves it."""

    async def build() -> FastAPI:
        return create_app(
            gateway_settings(checkpoint, **overrides),
            routes_source=routes_source,
            policy=policy,
            fast_routes=fast_routes,
        )

    return ServedApp(background.run(build()), background)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_checkpoint(
        tmp_path_factory.mktemp("gateway-ckpt") / "tiny-llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=MAX_MODEL_LEN,
    )


@pytest.fixture(scope="session")
def tokenizer(checkpoint: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def background() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


def start_engine(background: BackgroundLoop, checkpoint: Path, **overrides: Any) -> EngineServer:
    """The real engine service on ``checkpoint``, in-process, without a controller, started
    on ``background``'s loop; ``overrides`` change its settings."""
    settings = EngineSettings(
        **{
            "model": str(checkpoint),
            "served_model_name": MODEL_NAME,
            "device": "cpu",
            "dtype": "float32",
            "host": "127.0.0.1",
            "port": 0,
            "metrics_port": 0,
            "controller_address": "",
            "num_kv_blocks": 128,
            "max_model_len": MAX_MODEL_LEN,
            "data_dir": checkpoint.parent,
            **overrides,
        }
    )
    server = EngineServer(settings)
    background.run(server.start())
    return server


@pytest.fixture(scope="module")
def engine(checkpoint: Path, background: BackgroundLoop) -> Iterator[EngineServer]:
    """The real engine service, in-process, without a controller."""
    server = start_engine(background, checkpoint)
    yield server
    background.run(server.stop(grace_s=1))
