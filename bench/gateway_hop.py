"""The gateway's own cost per request, without an engine's compute in the way.

    python bench/gateway_hop.py [--requests N] [--prefill-ms MS] [--json PATH]

Starts an engine double that answers every ``Generate`` at once (a real ``EngineService``
gRPC server: a few token ids, no model), or ``--prefill-ms`` after the request came in as
a real engine's prefill would, and a gateway routed to it (``python -m gateway --engines``,
the demo model's tokenizer), then alternates, request by request:

- ``gateway``: a streamed ``/v1/completions`` (a 64-word prompt, 4 tokens) through the
  gateway, timed to the first event with text, by a client that reads the socket itself;
- ``gateway_httpx``: the same through ``httpx``, the client ``bench/serving.py`` uses;
- ``direct``: the same request's ``Generate`` straight to the double, timed to its first
  response (the reference: what the gateway's own gRPC call costs at least).

With ``--compare-source DIR`` a second gateway, run from another source tree (another
version), serves the same engine double, and the raw client's requests alternate between
the two (``gateway_compare``, ``gateway_compare_httpx``; each gateway gets the same traffic,
and they take turns at going first); ``compare_paired_ms_p50`` is the median, over raw
requests sent back to back, of this tree's time minus the other's: the two versions'
difference, with the machine's load drifting alike for both.

``gateway_hop_ms_p50`` is the gateway's p50 minus the direct p50: parsing, validation,
tokenization, routing, the gRPC call's setup, detokenization and the first SSE write. On a
busy shared machine ``bench/serving.py``'s ``gateway_overhead_ms_p50`` adds to this the time
the gateway process waits for a core; this benchmark keeps that small by doing one request at
a time. Prints a table, writes JSON with ``--json``.

With ``--prefill-ms`` both paths wait as long for the first token, so the hop stays the
gateway's own cost, but only what it does before the engine call goes out and after the
first token comes back: work the gateway does while the engine computes is off the path,
as it is in front of a real engine (``bench/serving.py``). With the instant engine it is
all on the path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # this tree's stubs, not an installed copy's

from switchyard.settings import default_data_dir  # noqa: E402
from switchyard.v1 import common_pb2, engine_pb2, engine_pb2_grpc  # noqa: E402

PROMPT = " ".join(["signal", "track", "yard", "switch"] * 16)
MAX_TOKENS = 4


class InstantEngine(engine_pb2_grpc.EngineServiceServicer):
    """Answers every request with ``max_tokens`` token ids, one per response, the first
    ``prefill_s`` after the request (at once when 0)."""

    def __init__(self, prefill_s: float = 0.0) -> None:
        self._prefill_s = prefill_s

    async def Generate(self, request, context):  # type: ignore[no-untyped-def]
        count = request.sampling.max_tokens or MAX_TOKENS
        if self._prefill_s:
            await asyncio.sleep(self._prefill_s)
        for position in range(count):
            last = position == count - 1
            yield engine_pb2.GenerateResponse(
                index=0,
                token_ids=[300 + position],
                finished=last,
                finish_reason="length" if last else "",
                num_prompt_tokens=len(request.prompt_token_ids),
            )

    async def GetStats(self, request, context):  # type: ignore[no-untyped-def]
        load = common_pb2.ReplicaLoad(max_num_seqs=256, max_queued_requests=256)
        return engine_pb2.GetStatsResponse(
            replica_id="instant", model="bench", max_model_len=4096, load=load
        )


async def serve_instant_engine(port: int, prefill_s: float = 0.0) -> None:
    server = grpc.aio.server()
    engine_pb2_grpc.add_EngineServiceServicer_to_server(InstantEngine(prefill_s), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RawClient:
    """HTTP/1.1 over one kept-alive socket, read by hand: next to no client-side cost."""

    def __init__(self, port: int, fields: dict[str, Any] | None = None) -> None:
        """``fields``: the completion request's body (default: this benchmark's)."""
        self._port = port
        fields = fields or {
            "model": "bench",
            "prompt": PROMPT,
            "max_tokens": MAX_TOKENS,
            "stream": True,
        }
        body = json.dumps(fields).encode()
        self._request = (
            b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self._port)

    async def first_text_s(self) -> float:
        start = time.perf_counter()
        self._writer.write(self._request)
        received, first = b"", None
        while not received.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
            chunk = await self._reader.read(65536)
            if not chunk:
                raise RuntimeError("the gateway closed the connection")
            received += chunk
            if first is None and b'"text":"' in received.partition(b"\r\n\r\n")[2]:
                first = time.perf_counter() - start
        if first is None or not received.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected answer: {received[:200]!r}")
        return first


async def httpx_first_text_s(http: httpx.AsyncClient, url: str) -> float:
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True}
    start = time.perf_counter()
    first = None
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {") and '"text":"' in line:
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("no text came back")
    return first


async def direct_first_s(stub: engine_pb2_grpc.EngineServiceStub, number: int) -> float:
    request = engine_pb2.GenerateRequest(
        request_id=f"hop-{number}",
        prompt_token_ids=list(range(5, 70)),
        sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS),
    )
    start = time.perf_counter()
    first = None
    async for _ in stub.Generate(request):
        if first is None:
            first = time.perf_counter() - start
    assert first is not None
    return first


async def measure(
    args: argparse.Namespace, gateway_port: int, engine_port: int, compare_port: int | None
) -> dict[str, Any]:
    raw = RawClient(gateway_port)
    await raw.open()
    compare = RawClient(compare_port) if compare_port is not None else None
    if compare is not None:
        await compare.open()
    url = f"http://127.0.0.1:{gateway_port}"
    samples: dict[str, list[float]] = {"gateway": [], "gateway_httpx": [], "direct": []}
    if compare is not None:
        samples["gateway_compare"] = []
        samples["gateway_compare_httpx"] = []
    async with (
        httpx.AsyncClient(timeout=30) as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{engine_port}") as channel,
    ):
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        for number in range(args.warmup + args.requests):
            timings: dict[str, float] = {}
            # Each gateway gets the same traffic (a raw request, then an httpx one), and the
            # two take turns at going first: the one that ran last has the warmer caches.
            turns = [("gateway", raw, url)]
            if compare is not None and compare_port is not None:
                turns.append(("gateway_compare", compare, f"http://127.0.0.1:{compare_port}"))
                if number % 2:
                    turns.reverse()
            for name, client, base_url in turns:
                timings[name] = await client.first_text_s()
                timings[f"{name}_httpx"] = await httpx_first_text_s(http, base_url)
            timings["direct"] = await direct_first_s(stub, number)
            if number >= args.warmup:
                for name, value in timings.items():
                    samples[name].append(value)

    def pct(values: list[float], q: int) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000

    paths = {
        name: {"first_ms_p50": pct(values, 50), "first_ms_p99": pct(values, 99)}
        for name, values in samples.items()
    }
    paired = {}
    if compare is not None:
        differences = [
            (this - other) * 1000
            for this, other in zip(samples["gateway"], samples["gateway_compare"], strict=True)
        ]
        paired = {"compare_paired_ms_p50": statistics.median(differences)}
    return {
        "config": {
            "requests": args.requests,
            "prompt_words": 64,
            "max_tokens": MAX_TOKENS,
            "prefill_ms": args.prefill_ms,
            "gateway_source": str(args.gateway_source),
            "compare_source": str(args.compare_source) if args.compare_source else None,
        },
        **paired,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "paths": paths,
        "gateway_hop_ms_p50": paths["gateway"]["first_ms_p50"] - paths["direct"]["first_ms_p50"],
        "gateway_hop_httpx_ms_p50": paths["gateway_httpx"]["first_ms_p50"]
        - paths["direct"]["first_ms_p50"],
    }


def wait_for(url: str, process: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the gateway exited while starting")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not answer 200 in {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="per path")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument(
        "--gateway-source",
        type=Path,
        default=REPO_ROOT,
        help="source tree whose gateway to run (to compare two versions)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="where the demo model's tokenizer is (built there on first use)",
    )
    parser.add_argument(
        "--compare-source",
        type=Path,
        help="another source tree whose gateway serves the same engine, requests alternated",
    )
    parser.add_argument(
        "--prefill-ms",
        type=float,
        default=0.0,
        help="the engine double's time to its first token (0: at once)",
    )
    parser.add_argument("--serve-engine", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_engine:
        asyncio.run(serve_instant_engine(args.serve_engine, args.prefill_ms / 1000))
        return 0

    engine_port, gateway_port = free_port(), free_port()
    data_dir = str(args.data_dir)
    gateway_argv = [
        sys.executable, "-m", "gateway",
        "--engines", f"127.0.0.1:{engine_port}",
        "--host", "127.0.0.1",
        "--port", str(gateway_port),
        "--model", "demo",
        "--served-model-name", "bench",
        "--data-dir", data_dir,
        "--log-level", "WARNING",
    ]  # fmt: skip
    engine_argv = [
        sys.executable, __file__,
        "--serve-engine", str(engine_port),
        "--prefill-ms", str(args.prefill_ms),
    ]  # fmt: skip
    engine = subprocess.Popen(
        engine_argv,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    gateway = subprocess.Popen(
        gateway_argv,
        cwd=args.gateway_source,
        env={**os.environ, "PYTHONPATH": str(args.gateway_source)},
    )
    processes = [gateway, engine]
    compare_port = None
    if args.compare_source:
        compare_port = free_port()
        compare_argv = [*gateway_argv]
        compare_argv[compare_argv.index("--port") + 1] = str(compare_port)
        processes.append(
            subprocess.Popen(
                compare_argv,
                cwd=args.compare_source,
                env={**os.environ, "PYTHONPATH": str(args.compare_source)},
            )
        )
    try:
        wait_for(f"http://127.0.0.1:{gateway_port}/health", gateway)
        if compare_port is not None:
            wait_for(f"http://127.0.0.1:{compare_port}/health", processes[-1])
        report = asyncio.run(measure(args, gateway_port, engine_port, compare_port))
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
    prefill = f", first token after {args.prefill_ms:g} ms" if args.prefill_ms else ""
    print(f"\n{args.requests} requests per path, one at a time, {MAX_TOKENS} tokens each{prefill}")
    print(f"{'path':<34}{'first text p50':>16}{'p99':>10}")
    labels = {
        "gateway": "through the gateway (raw client)",
        "gateway_httpx": "through the gateway (httpx)",
        "direct": "engine double direct (gRPC)",
    }
    if args.compare_source:
        labels["gateway_compare"] = "the other tree's gateway (raw)"
        labels["gateway_compare_httpx"] = "the other tree's gateway (httpx)"
    for name, label in labels.items():
        figures = report["paths"][name]
        print(f"{label:<34}{figures['first_ms_p50']:>13.2f} ms{figures['first_ms_p99']:>7.2f} ms")
    print(f"gateway_hop_ms_p50: {report['gateway_hop_ms_p50']:.2f} ms "
          f"(with httpx: {report['gateway_hop_httpx_ms_p50']:.2f} ms)")  # fmt: skip
    if args.compare_source:
        print(f"this tree minus {args.compare_source}, paired p50: "
              f"{report['compare_paired_ms_p50']:+.3f} ms")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
