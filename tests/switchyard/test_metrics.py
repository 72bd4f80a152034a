"""A metrics server serves its own registry only."""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry, Counter

from switchyard.metrics import start_metrics_server


def test_serves_its_registry_on_a_picked_port() -> None:
    registry = CollectorRegistry()
    Counter("switchyard_test_events", "Events.", registry=registry).inc(3)
    server = start_metrics_server(0, registry, host="127.0.0.1")
    try:
        text = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).text
    finally:
        server.stop()
    assert "switchyard_test_events_total 3.0" in text
    assert "python_gc_objects_collected_total" not in text  # not the global registry
