"""What the chaos tests look at: the stack's processes, what a streaming client sees, and
whether the stack went back to idle (no request still counted anywhere, no KV block held)."""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field

import httpx

from tests.e2e.stack import (
    API_KEY,
    MODEL_NAME,
    Stack,
    engine_stats,
    ready_replicas,
    wait_until,
)

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class StreamResult:
    """What one streaming client saw: the content chunks, the finish reason, the error event
    if one came, and whether the stream ended properly (``data: [DONE]``)."""

    chunks: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    error: dict[str, object] | None = None
    done: bool = False
    status: int = 0
    first_chunk: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    failure: BaseException | None = None


def stream_completion(stack: Stack, prompt: str, max_tokens: int, result: StreamResult) -> None:
    """Streams one completion (ignoring EOS, so it runs ``max_tokens`` long) into ``result``."""
    body = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    try:
        with httpx.stream(
            "POST", f"{stack.url}/v1/completions", json=body, headers=HEADERS, timeout=120
        ) as response:
            result.status = response.status_code
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line.removeprefix("data: ")
                if payload == "[DONE]":
                    result.done = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    result.error = event["error"]
                    continue
                choice = event["choices"][0]
                result.chunks.append(choice["text"])
                result.finish_reason = choice.get("finish_reason") or result.finish_reason
                result.first_chunk.set()
    except BaseException as exc:  # recorded for the test thread to re-raise
        result.failure = exc
    finally:
        result.finished.set()


def start_stream(stack: Stack, prompt: str, max_tokens: int) -> StreamResult:
    result = StreamResult()
    threading.Thread(
        target=stream_completion, args=(stack, prompt, max_tokens, result), daemon=True
    ).start()
    return result


def complete(stack: Stack, prompt: str = "Hello", max_tokens: int = 4) -> httpx.Response:
    """One completion, ``max_tokens`` long (EOS ignored), not streamed."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    return httpx.post(f"{stack.url}/v1/completions", json=body, headers=HEADERS, timeout=120)


def gateway_in_flight(stack: Stack) -> float:
    """The gateway's in-flight requests over every endpoint (``/metrics`` itself excluded)."""
    text = httpx.get(f"{stack.url}/metrics", timeout=10).text
    total = 0.0
    for match in re.finditer(
        r'^switchyard_gateway_in_flight_requests\{endpoint="([^"]*)"\} (\S+)$', text, re.M
    ):
        if match.group(1) != "/metrics":
            total += float(match.group(2))
    return total


def assert_idle(stack: Stack, timeout_s: float = 30.0) -> None:
    """Every READY engine runs and queues nothing and holds no KV block beyond its
    evictable prefix cache; the gateway has nothing in flight."""

    def idle() -> bool:
        replicas = ready_replicas(stack)
        if not replicas:
            return False
        for address in replicas.values():
            stats = engine_stats(address)
            if stats.load.num_running or stats.load.num_waiting:
                return False
            if stats.num_blocks_free != stats.num_blocks_total:
                return False
        return gateway_in_flight(stack) == 0

    wait_until(idle, timeout_s, "the stack to be idle (no request or KV block left)")
