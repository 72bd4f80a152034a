"""A test double of the Kubernetes API server: a real HTTP server on 127.0.0.1, in threads.

No Kubernetes API server (nor kind, minikube or a container engine) can run on the machines
these tests run on, so this double serves the few endpoints the controller calls, with the
behaviour the controller depends on:

- pods: list with ``labelSelector`` (equality terms) and a resourceVersion; watch from a
  resourceVersion, replaying the events after it, then streaming new ones as JSON lines until
  ``timeoutSeconds`` or until the test drops the connection; a watch from a version older than
  the kept history gets an ``ERROR`` event with a 410 Status, as a real server sends;
- ``apps/v1`` deployments/scale: get, and merge-patch of ``spec.replicas``;
- ``coordination.k8s.io/v1`` leases: get, create (409 if it exists), replace (409 unless the
  body's resourceVersion is the current one);
- a bearer token on every request (401 without it) unless made without one, and injectable
  500s.

Tests play the cluster with :meth:`add_pod`, :meth:`set_pod`, :meth:`begin_delete`,
:meth:`delete_pod`, :meth:`kubectl_scale`; :meth:`hidden` makes changes while no watch sees
them and then drops the watches (optionally forgetting the history, for a 410).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Json = dict[str, Any]
NAMESPACE = "switchyard"
DEPLOYMENT = "switchyard-engine"
TOKEN = "test-token"
ENGINE_LABELS = {"app.kubernetes.io/name": "switchyard", "app.kubernetes.io/component": "engine"}

_PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
_SCALE = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)/scale$")
_LEASES = re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/([^/]+)/leases(?:/([^/]+))?$")


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    content_type: str = ""


@dataclass(slots=True)
class _State:
    rv: int = 100
    oldest_rv: int = 0  # a watch from below this is answered 410
    pods: dict[str, Json] = field(default_factory=dict)
    events: list[tuple[int, str, Json]] = field(default_factory=list)
    replicas: int = 1
    scale_patches: list[int] = field(default_factory=list)
    leases: dict[str, Json] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    watch_generation: int = 0  # bumped to drop every open watch
    watching: int = 0  # watches open (their generation taken: a drop reaches them)
    paused: bool = False  # open watches send nothing
    failures_left: int = 0  # answer this many requests with 500
    fail_leases: bool = False


def _status(code: int, message: str) -> Json:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
            "message": message}  # fmt: skip


def _matches(pod: Json, selector: str) -> bool:
    labels = pod["metadata"].get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class KubeApiDouble:
    """See the module docstring; ``url`` once constructed, ``close`` at the end. With
    ``token=None`` it asks for no token, as ``kubectl proxy`` does."""

    def __init__(self, token: str | None = TOKEN) -> None:
        self.token = token
        self.state = _State()
        self.cond = threading.Condition()
        double = self

        class Handler(_Handler):
            api = double

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self.drop_watches()
        self._server.shutdown()
        self._server.server_close()

    # -- the cluster, as tests play it

    def _change(self, kind: str, pod: Json) -> None:
        """Records one pod event; call with the condition held."""
        self.state.rv += 1
        pod["metadata"]["resourceVersion"] = str(self.state.rv)
        self.state.events.append((self.state.rv, kind, json.loads(json.dumps(pod))))
        self.cond.notify_all()

    def add_pod(
        self, name: str, ip: str = "", ready: bool = False, labels: dict[str, str] | None = None
    ) -> None:
        pod: Json = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": dict(ENGINE_LABELS if labels is None else labels)},
            "status": {"phase": "Running" if ip else "Pending"},
        }  # fmt: skip
        with self.cond:
            self.state.pods[name] = pod
            self._set_status(pod, ip, ready)
            self._change("ADDED", pod)

    def set_pod(self, name: str, ip: str | None = None, ready: bool | None = None) -> None:
        with self.cond:
            pod = self.state.pods[name]
            status = pod["status"]
            current_ready = any(c["status"] == "True" for c in status.get("conditions", []))
            self._set_status(
                pod,
                status.get("podIP", "") if ip is None else ip,
                current_ready if ready is None else ready,
            )
            self._change("MODIFIED", pod)

    @staticmethod
    def _set_status(pod: Json, ip: str, ready: bool) -> None:
        status = pod["status"]
        if ip:
            status["podIP"] = ip
            status["phase"] = "Running"
        status["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]

    def begin_delete(self, name: str) -> None:
        """What a scale-down does first: the pod gets a deletionTimestamp and is not ready."""
        with self.cond:
            pod = self.state.pods[name]
            pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
            self._set_status(pod, pod["status"].get("podIP", ""), ready=False)
            self._change("MODIFIED", pod)

    def delete_pod(self, name: str) -> None:
        with self.cond:
            pod = self.state.pods.pop(name)
            self._change("DELETED", pod)

    def kubectl_scale(self, replicas: int) -> None:
        with self.cond:
            self.state.replicas = replicas

    def drop_watches(self) -> None:
        with self.cond:
            self.state.watch_generation += 1
            self.cond.notify_all()

    @contextlib.contextmanager
    def hidden(self, expire_history: bool = False) -> Iterator[None]:
        """Changes made inside reach no open watch; on leaving, the watches are dropped and,
        with ``expire_history``, resuming from any version seen so far answers 410."""
        with self.cond:
            self.state.paused = True
        try:
            yield
        finally:
            with self.cond:
                if expire_history:  # only a fresh list's version is recent enough
                    self.state.oldest_rv = self.state.rv
                self.state.watch_generation += 1
                self.state.paused = False
                self.cond.notify_all()

    def fail_next(self, count: int) -> None:
        with self.cond:
            self.state.failures_left = count

    def set_fail_leases(self, fail: bool) -> None:
        with self.cond:
            self.state.fail_leases = fail

    # -- what tests read

    def requests(self, method: str, pattern: str) -> list[Request]:
        with self.cond:
            return [r for r in self.state.requests if r.method == method
                    and re.search(pattern, r.path)]  # fmt: skip

    def open_watches(self) -> int:
        """Watches being served now (a request is recorded before its watch opens)."""
        with self.cond:
            return self.state.watching

    def pod_watches(self) -> list[Request]:
        return [r for r in self.requests("GET", "/pods$") if r.query.get("watch") == "true"]

    def pod_lists(self) -> list[Request]:
        return [r for r in self.requests("GET", "/pods$") if r.query.get("watch") != "true"]

    def lease(self, name: str) -> Json | None:
        with self.cond:
            return self.state.leases.get(name)


class _Handler(BaseHTTPRequestHandler):
    api: KubeApiDouble

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def _send(self, code: int, body: Json) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Json:
        length = int(self.headers.get("Content-Length") or 0)
        parsed: Json = json.loads(self.rfile.read(length) or b"{}")
        return parsed

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        api, state = self.api, self.api.state
        with api.cond:
            state.requests.append(
                Request(method, url.path, query, self.headers.get("Content-Type", ""))
            )
            failing = state.failures_left > 0
            if failing:
                state.failures_left -= 1
        if api.token and self.headers.get("Authorization") != f"Bearer {api.token}":
            return self._send(401, _status(401, "Unauthorized"))
        if failing:
            return self._send(500, _status(500, "injected failure"))
        if match := _PODS.match(url.path):
            if method != "GET" or match[1] != NAMESPACE:
                return self._send(404, _status(404, "not found"))
            if query.get("watch") == "true":
                return self._watch(query)
            return self._list(query.get("labelSelector", ""))
        if match := _SCALE.match(url.path):
            return self._scale(method, match[1], match[2])
        if match := _LEASES.match(url.path):
            return self._lease(method, match[1], match[2])
        return self._send(404, _status(404, f"no route for {url.path}"))

    def _list(self, selector: str) -> None:
        with self.api.cond:
            items = [p for p in self.api.state.pods.values() if _matches(p, selector)]
            body = {"kind": "PodList", "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self.api.state.rv)},
                    "items": json.loads(json.dumps(items))}  # fmt: skip
        self._send(200, body)

    def _watch(self, query: dict[str, str]) -> None:
        api, state = self.api, self.api.state
        selector = query.get("labelSelector", "")
        sent = int(query.get("resourceVersion") or 0)
        deadline = time.monotonic() + int(query.get("timeoutSeconds") or 60)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()  # HTTP/1.0 without a length: the stream ends when we close
        with api.cond:
            generation = state.watch_generation
            if sent < state.oldest_rv:
                return self._write_line({"type": "ERROR", "object": _status(410, "too old")})
            state.watching += 1
        try:
            self._stream_events(generation, sent, selector, deadline)
        finally:
            with api.cond:
                state.watching -= 1

    def _stream_events(self, generation: int, sent: int, selector: str, deadline: float) -> None:
        api, state = self.api, self.api.state
        while True:
            with api.cond:
                if state.watch_generation != generation or time.monotonic() >= deadline:
                    return
                pending = [] if state.paused else [
                    (rv, kind, pod) for rv, kind, pod in state.events
                    if rv > sent and _matches(pod, selector)
                ]  # fmt: skip
                if not pending:
                    api.cond.wait(timeout=0.05)
                    continue
            for rv, kind, pod in pending:
                self._write_line({"type": kind, "object": pod})
                sent = rv

    def _write_line(self, event: Json) -> None:
        with contextlib.suppress(OSError):
            self.wfile.write(json.dumps(event).encode() + b"\n")
            self.wfile.flush()

    def _scale(self, method: str, namespace: str, name: str) -> None:
        state = self.api.state
        if namespace != NAMESPACE or name != DEPLOYMENT:
            return self._send(404, _status(404, "deployment not found"))
        if method == "PATCH":
            if self.headers.get("Content-Type") != "application/merge-patch+json":
                return self._send(415, _status(415, "unsupported patch type"))
            replicas = int(self._body()["spec"]["replicas"])
            with self.api.cond:
                state.replicas = replicas
                state.scale_patches.append(replicas)
        elif method != "GET":
            return self._send(405, _status(405, "method not allowed"))
        with self.api.cond:
            replicas = state.replicas
        self._send(200, {"kind": "Scale", "apiVersion": "autoscaling/v1",
                         "metadata": {"name": name, "namespace": namespace},
                         "spec": {"replicas": replicas}, "status": {"replicas": replicas}})  # fmt: skip

    def _lease(self, method: str, namespace: str, name: str | None) -> None:
        api, state = self.api, self.api.state
        if namespace != NAMESPACE:
            return self._send(404, _status(404, "namespace not found"))
        if state.fail_leases:
            return self._send(500, _status(500, "leases unavailable"))
        body = self._body() if method in ("POST", "PUT") else {}
        with api.cond:
            if method == "GET" and name:
                lease = state.leases.get(name)
                if lease is None:
                    return self._send(404, _status(404, f"lease {name} not found"))
                return self._send(200, lease)
            if method == "POST" and not name:
                name = body["metadata"]["name"]
                if name in state.leases:
                    return self._send(409, _status(409, "already exists"))
            elif method == "PUT" and name:
                current = state.leases.get(name)
                if current is None:
                    return self._send(404, _status(404, f"lease {name} not found"))
                if (
                    body["metadata"].get("resourceVersion")
                    != current["metadata"]["resourceVersion"]
                ):
                    return self._send(409, _status(409, "the object has been modified"))
            else:
                return self._send(405, _status(405, "method not allowed"))
            state.rv += 1
            body["metadata"]["resourceVersion"] = str(state.rv)
            state.leases[name] = body
        self._send(201 if method == "POST" else 200, body)
