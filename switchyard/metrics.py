"""Prometheus endpoints: each service serves ``/metrics`` from its own registry.

A dedicated :class:`prometheus_client.CollectorRegistry` per server keeps a service's
metrics apart from whatever else the process imports (and lets tests run several services
in one process).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


@dataclass(slots=True)
class MetricsServer:
    """A running ``/metrics`` HTTP endpoint; ``port`` is the bound port."""

    registry: CollectorRegistry
    port: int
    _http: WSGIServer
    _thread: threading.Thread

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(
    port: int, registry: CollectorRegistry, host: str = "0.0.0.0"
) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    ``port=0`` binds a free port; read it from the returned server's ``port``.
    """
    http, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(registry=registry, port=http.server_port, _http=http, _thread=thread)
