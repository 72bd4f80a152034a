"""The engine service's LoRA edge: the adapter RPCs, their wire shapes and metrics.

Loading reads and validates the adapter's files on a worker thread, then registers it on
the engine thread (the only one that touches the engine), so a slow disk or hub download
never stalls the step loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from engine_service.engine import LLMEngine
from engine_service.engine.outputs import EngineStats, LoRAStats
from switchyard.v1 import common_pb2, engine_pb2

RunOnEngine = Callable[[Callable[[LLMEngine], Any]], Awaitable[Any]]


def adapter_infos(lora: LoRAStats | None) -> list[common_pb2.LoRAAdapterInfo]:
    if lora is None:
        return []
    return [
        common_pb2.LoRAAdapterInfo(
            name=a.name,
            path=a.path,
            fingerprint=a.fingerprint,
            resident=a.resident,
            requests_total=a.requests_total,
        )
        for a in lora.adapters
    ]


async def load_adapter(
    engine: LLMEngine, run_on_engine: RunOnEngine, request: engine_pb2.LoadLoRAAdapterRequest
) -> engine_pb2.LoadLoRAAdapterResponse:
    """Raises ``ValueError`` (bad adapter or LoRA off), ``FileExistsError`` (loaded name
    without ``load_inplace``); the caller maps them onto status codes."""
    name, path, replace = request.lora_name, request.lora_path, request.load_inplace
    if not name or not path:
        raise ValueError("lora_name and lora_path are required")
    adapter = await asyncio.to_thread(engine.read_lora, name, path, replace)
    await run_on_engine(lambda e: e.register_lora(adapter, replace))
    return engine_pb2.LoadLoRAAdapterResponse(
        adapter=common_pb2.LoRAAdapterInfo(
            name=adapter.name, path=adapter.source, fingerprint=adapter.fingerprint
        )
    )


async def unload_adapter(
    run_on_engine: RunOnEngine, request: engine_pb2.UnloadLoRAAdapterRequest
) -> engine_pb2.UnloadLoRAAdapterResponse:
    await run_on_engine(lambda e: e.remove_lora(request.lora_name))
    return engine_pb2.UnloadLoRAAdapterResponse()


def lora_metrics(model_name: str, stats: EngineStats) -> Iterator[Metric]:
    """vLLM's ``vllm:lora_requests_info`` (value: the snapshot's time, labels: the adapters
    of running and waiting requests, comma-separated, and ``max_lora``), plus load counts."""
    lora = stats.lora
    if lora is None:
        return
    info = GaugeMetricFamily(
        "vllm:lora_requests_info",
        "Running stats on LoRA requests.",
        labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
    )
    info.add_metric(
        [",".join(lora.running), ",".join(lora.waiting), str(lora.max_loras)], time.time()
    )
    yield info
    loads = CounterMetricFamily(
        "switchyard:lora_loads",
        "LoRA adapters written into a device slot.",
        labels=["model_name"],
    )
    loads.add_metric([model_name], lora.loads_total)
    yield loads
    seconds = CounterMetricFamily(
        "switchyard:lora_load_seconds",
        "Time spent writing LoRA adapters into device slots (reading them again from disk "
        "included).",
        labels=["model_name"],
    )
    seconds.add_metric([model_name], lora.load_seconds_total)
    yield seconds
