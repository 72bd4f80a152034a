"""Serving benchmark: latency and throughput through the gateway, against the engine direct.

    python bench/serving.py [--url URL --controller ADDR] [--model M] [--rate R] [--rounds N]
                            [--json PATH]

Starts ``switchyard up`` on free ports (or uses ``--url`` and ``--controller``), then sends
the same kind of requests along each path, interleaved in one Poisson schedule: through the
gateway (``/v1/completions``, streamed, text prompt) and straight to one engine over gRPC
(``Generate``, the prompt tokenized here with the model's tokenizer). Every request is
greedy with ``ignore_eos``, so both runs generate the same number of tokens. Reports TTFT,
inter-token latency (ITL: the gaps between streamed tokens) and end-to-end latency at p50 and
p99, request and output-token throughput; prints a table and writes JSON with ``--json``.

``gateway_overhead_ms_p50`` is the latency the gateway adds to a request: its TTFT p50 minus
the engine's, over ``--idle-pairs`` requests per path sent one at a time before the schedule
(each gateway request beside its direct twin, the order alternating; ``--idle-max-tokens``
output tokens), with ``gateway_overhead_paired_ms_p50`` beside it (the median of the pairs'
TTFT differences) and ``gateway_overhead_ms_p99``, and ``gateway_overhead_ms_p50_se``, the figure's bootstrap
standard error: the engine's own TTFT varies by 4-20 ms (standard deviation) per request on
a shared 2-core host, which moved a difference of two medians over 160 requests by 0.6-0.8
ms between quiet runs and by 2-4 ms under other load, so read one run's figure with it (640
pairs by default since: half that standard error, about a minute more).
Under the schedule, requests queue behind
each other's prefills, and which request of an arrival group waits longer is chance: the
same figures there (``gateway_overhead_loaded_ms_p50``, ``..._loaded_paired_ms_p50``,
``..._loaded_ms_p99``) moved from -12 to +11 ms between runs of the same code on a 2-core
machine, far more than the gateway costs, so they are reported, not used for the gateway's
own cost.

With ``--limits`` (the default when the benchmark starts the stack and a ``redis-server`` is at
hand) a third path runs the same requests through a second gateway with per-key rate limits
on, counted in Redis (``bench/limited_gateway.py``); ``limits_overhead_ms_p50`` is its TTFT p50
minus the stack gateway's (limits off), and ``limits_ttft_ratio_p50`` their ratio.

What makes the two runs comparable:

- The engine caches prompt prefixes, so the run that went second would find every prompt
  already prefilled. Each path therefore gets its own prompts: request i's words, shuffled,
  so that both paths prefill the same number of tokens (checked) and share no cached block.
  Warm-up requests, and each of the ``--rounds``, use prompts of their own.
- The paths share one open-loop schedule at ``--rate`` (``--num-requests`` arrivals per path
  and round): arrivals take the paths in turn (request k's gateway prompt, its shuffled
  direct twin, the limited gateway's own), and rounds rotate which path goes first. Every
  path thus sees the same engine load and the same drift in the machine's other load, which on a shared machine moves TTFT by far more than the gateway
  does; run after run (``--sequential``: all of one path, then all of the other, per round)
  the drift between the two halves showed up as "overhead" of -5 to +25 ms.
- Both clients are light and do comparable work per token: by default a socket-level HTTP
  client (``LightClient``: kept-alive connections, chunked SSE read by hand, one
  ``json.loads`` per event) for the gateway, the generated gRPC stub for the engine. The
  gateway's figures include its HTTP hop (server side), which is its real cost; with
  ``--client httpx`` they also include ``httpx``'s own per-request cost (~1.7 ms here), as an
  application on the ``openai`` package would see it.
- The gateway's prompt token count (its usage chunk) is checked against the tokenization
  used for the direct run.
- The gateway's TTFT is its first event with text; it cannot send a token that is half a
  UTF-8 character, so now and then it waits one token longer than the engine.
- Gateway, engine and this client share the machine's cores; on a small CPU box their
  contention is part of every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.limited_gateway import BENCH_KEY, LimitedGateway, start_limited_gateway
from switchyard.v1 import (
    common_pb2,
    controller_pb2,
    controller_pb2_grpc,
    engine_pb2,
    engine_pb2_grpc,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

WORDS = (
    "signal", "track", "yard", "switch", "freight", "engine", "siding", "junction", "ballast",
    "sleeper", "coupling", "shunter", "wagon", "depot", "platform", "timetable", "gauge",
    "points", "crossing", "lantern",
)  # fmt: skip


@dataclass(slots=True)
class Sample:
    """One request's timings, in seconds from its own send."""

    ttft_s: float
    e2e_s: float
    gaps_s: list[float]
    output_tokens: int
    # (round, k) of an interleaved schedule: the k-th arrival group of that round, whose
    # requests on the other paths were sent at nearly the same moment.
    slot: tuple[int, int] | None = None


@dataclass(slots=True)
class PathResult:
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict[str, float | int]:
        ok = self.samples
        gaps = [g for s in ok for g in s.gaps_s]
        tokens = sum(s.output_tokens for s in ok)
        return {
            "requests": len(ok),
            "errors": len(self.errors),
            "ttft_ms_p50": _pct([s.ttft_s for s in ok], 50),
            "ttft_ms_p99": _pct([s.ttft_s for s in ok], 99),
            "itl_ms_p50": _pct(gaps, 50),
            "itl_ms_p99": _pct(gaps, 99),
            "e2e_ms_p50": _pct([s.e2e_s for s in ok], 50),
            "e2e_ms_p99": _pct([s.e2e_s for s in ok], 99),
            "requests_per_s": len(ok) / self.wall_s if self.wall_s else 0.0,
            "output_tokens_per_s": tokens / self.wall_s if self.wall_s else 0.0,
        }


def paired_overhead_ms_p50(gateway: PathResult, direct: PathResult) -> float:
    """The median over arrival groups of (gateway TTFT - direct TTFT) of the two requests
    sent together: each pair saw the same engine state and machine load, so the median of
    the differences moves far less from run to run than the difference of the medians.
    NaN when the paths were not interleaved."""
    direct_by_slot = {s.slot: s for s in direct.samples if s.slot is not None}
    diffs = [
        g.ttft_s - direct_by_slot[g.slot].ttft_s
        for g in gateway.samples
        if g.slot is not None and g.slot in direct_by_slot
    ]
    return statistics.median(diffs) * 1000 if diffs else float("nan")


def overhead_standard_error_ms(
    gateway: PathResult, direct: PathResult, resamples: int = 1000, seed: int = 0
) -> float:
    """The bootstrap standard error of ``gateway_overhead_ms_p50`` (the difference of the
    two TTFT medians): how far the figure would move between runs from the sampling of the
    engine's own TTFT alone, which varies by several ms per request on a shared CPU host.
    NaN with fewer than two samples on a path."""
    ttfts = [[s.ttft_s for s in gateway.samples], [s.ttft_s for s in direct.samples]]
    if min(len(t) for t in ttfts) < 2:
        return float("nan")
    rng = random.Random(seed)
    differences = [
        statistics.median(rng.choices(ttfts[0], k=len(ttfts[0])))
        - statistics.median(rng.choices(ttfts[1], k=len(ttfts[1])))
        for _ in range(resamples)
    ]
    return statistics.pstdev(differences) * 1000


def _pct(values_s: list[float], q: int) -> float:
    if not values_s:
        return float("nan")
    if len(values_s) == 1:
        return values_s[0] * 1000
    return statistics.quantiles(values_s, n=100, method="inclusive")[q - 1] * 1000


# -- HTTP clients ----------------------------------------------------------------------------


class LightClient:
    """A streaming HTTP/1.1 client over kept-alive asyncio connections that reads the bytes
    itself: next to no client-side cost, like the generated gRPC stub of the direct path
    (``bench/gateway_hop.py`` measured ``httpx`` at ~1.7 ms per streamed request on this
    machine, which ``gateway_overhead_ms_p50`` would otherwise count as the gateway's)."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parsed = urllib.parse.urlsplit(url)
        self._host, self._port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self._headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def stream_lines(self, path: str, body: dict[str, Any]):
        """POSTs ``body`` as JSON; yields the response's lines (status checked first)."""
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self._host}\r\ncontent-type: application/json\r\n"
            f"{self._headers}content-length: {len(data)}\r\n\r\n"
        ).encode()
        status = b""
        while self._idle and not status:  # the server may have closed an idle connection
            reader, writer = self._idle.pop()
            try:
                writer.write(head + data)
                status = await reader.readline()
            except ConnectionError:
                status = b""
            if not status:
                writer.close()
        if not status:
            reader, writer = await asyncio.open_connection(self._host, self._port)
            writer.write(head + data)
            status = await reader.readline()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if not status.startswith(b"HTTP/1.1 200"):
            writer.close()
            raise RuntimeError(f"HTTP {status.decode().strip()}")
        pending = b""
        if headers.get("transfer-encoding") == "chunked":
            while size := int((await reader.readline()).strip() or b"0", 16):
                pending += await reader.readexactly(size)
                await reader.readexactly(2)
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode().rstrip("\r")
            await reader.readexactly(2)  # the empty trailer
        else:
            pending = await reader.readexactly(int(headers.get("content-length", "0")))
        for line in pending.split(b"\n"):
            yield line.decode().rstrip("\r")
        if headers.get("connection") == "close":
            writer.close()
        else:
            self._idle.append((reader, writer))

    async def aclose(self) -> None:
        for _, writer in self._idle:
            writer.close()


class HttpxClient:
    """The same interface over ``httpx`` (``--client httpx``): what the ``openai`` package
    uses, its client-side cost included."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self._url = url
        self._http = httpx.AsyncClient(timeout=600, headers=headers)

    async def stream_lines(self, path: str, body: dict[str, Any]):
        async with self._http.stream("POST", f"{self._url}{path}", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(
                    f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                )
            async for line in response.aiter_lines():
                yield line

    async def aclose(self) -> None:
        await self._http.aclose()


def http_client(kind: str, url: str, headers: dict[str, str]) -> LightClient | HttpxClient:
    return LightClient(url, headers) if kind == "light" else HttpxClient(url, headers)


# -- the two paths ---------------------------------------------------------------------------


async def through_gateway(
    http: LightClient | HttpxClient, model: str, prompt: str, max_tokens: int, prompt_tokens: int
) -> Sample:
    """Streams one completion; ``prompt_tokens`` is what the direct run's tokenization of
    ``prompt`` gives, checked against the gateway's usage so both paths prefill alike."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    arrivals: list[float] = []
    output_tokens = 0
    async for line in http.stream_lines("/v1/completions", body):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line.removeprefix("data: "))
        if chunk.get("usage"):
            output_tokens = chunk["usage"]["completion_tokens"]
            if chunk["usage"]["prompt_tokens"] != prompt_tokens:
                raise RuntimeError(
                    f"the gateway counted {chunk['usage']['prompt_tokens']} prompt tokens, "
                    f"the bench's tokenizer {prompt_tokens}"
                )
        if any(choice.get("text") for choice in chunk.get("choices", [])):
            arrivals.append(time.perf_counter())
    end = time.perf_counter()
    if not arrivals:
        raise RuntimeError("no tokens came back")
    return Sample(
        ttft_s=arrivals[0] - start,
        e2e_s=end - start,
        gaps_s=[b - a for a, b in itertools.pairwise(arrivals)],
        output_tokens=output_tokens,
    )


async def direct_to_engine(
    stub: engine_pb2_grpc.EngineServiceStub, prompt_ids: list[int], max_tokens: int
) -> Sample:
    request = engine_pb2.GenerateRequest(
        request_id=f"bench-{uuid.uuid4().hex}",
        prompt_token_ids=prompt_ids,
        sampling=common_pb2.SamplingParams(
            n=1, max_tokens=max_tokens, temperature=0.0, top_p=1.0, ignore_eos=True
        ),
    )
    start = time.perf_counter()
    arrivals: list[float] = []
    output_tokens = 0
    async for response in stub.Generate(request):
        if response.token_ids:
            arrivals.append(time.perf_counter())
            output_tokens += len(response.token_ids)
    end = time.perf_counter()
    if not arrivals:
        raise RuntimeError("no tokens came back")
    return Sample(
        ttft_s=arrivals[0] - start,
        e2e_s=end - start,
        gaps_s=[b - a for a, b in itertools.pairwise(arrivals)],
        output_tokens=output_tokens,
    )


async def run_schedule(offsets_s: list[float], send: Any, result: PathResult) -> None:
    """Fires ``send(i)`` at each offset from now (open loop) and collects the samples."""

    async def fire(i: int, offset_s: float, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + offset_s - time.perf_counter()))
        try:
            result.samples.append(await send(i))
        except Exception as exc:  # a failed request is a result too; it is reported
            result.errors.append(f"{type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    await asyncio.gather(*(fire(i, offset, t0) for i, offset in enumerate(offsets_s)))
    result.wall_s += time.perf_counter() - t0


async def run_interleaved(
    offsets_s: list[float], runs: list[tuple[Any, PathResult]], round_number: int = 0
) -> None:
    """One open-loop schedule for every path: with ``n`` paths, arrival ``n*k + j`` sends
    prompt ``k`` through ``runs[j]``. Each path's wall time is the schedule's, so its
    requests/s is its share."""
    parts = [PathResult() for _ in runs]

    async def send(i: int) -> Sample:
        return await runs[i % len(runs)][0](i // len(runs))

    async def fire(i: int, offset_s: float, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + offset_s - time.perf_counter()))
        result = parts[i % len(runs)]
        try:
            sample = await send(i)
            sample.slot = (round_number, i // len(runs))
            result.samples.append(sample)
        except Exception as exc:  # a failed request is a result too; it is reported
            result.errors.append(f"{type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    await asyncio.gather(*(fire(i, offset, t0) for i, offset in enumerate(offsets_s)))
    wall_s = time.perf_counter() - t0
    for (_, result), part in zip(runs, parts):
        result.samples.extend(part.samples)
        result.errors.extend(part.errors)
        result.wall_s += wall_s


@dataclass(slots=True)
class Prompt:
    """One request's prompt: ``text`` for the gateway, ``direct_token_ids`` for the engine.

    The direct prompt is the same words in another order, as many tokens long, so that
    neither run finds the other's blocks in the engine's prefix cache.
    """

    text: str
    token_ids: list[int]  # ``text`` as the gateway tokenizes it
    direct_token_ids: list[int]


def make_prompts(
    tokenizer: Any, rng: random.Random, shuffle_rng: random.Random, count: int, num_words: int
) -> list[Prompt]:
    def encode(text: str) -> list[int]:
        return [int(t) for t in tokenizer(text)["input_ids"]]

    prompts = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(num_words)]
        text = " ".join(words)
        token_ids = encode(text)
        for _attempt in range(1000):
            direct_ids = encode(" ".join(shuffle_rng.sample(words, len(words))))
            # Differing by the first token after any BOS puts the difference in the first
            # KV block; block hashes are chained, so no block of one matches the other.
            first_difference = next(
                (pos for pos, (a, b) in enumerate(zip(token_ids, direct_ids)) if a != b), None
            )
            if len(direct_ids) == len(token_ids) and first_difference in (0, 1):
                break
        else:
            raise SystemExit("could not build a direct prompt as long as the gateway's")
        prompts.append(Prompt(text, token_ids, direct_ids))
    return prompts


# -- the stack -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_stack(
    args: argparse.Namespace, log_path: Path
) -> tuple[subprocess.Popen[bytes], str, str]:
    """``switchyard up`` on free ports; returns (process, gateway URL, controller address)."""
    port, controller_port = free_port(), free_port()
    argv = [
        sys.executable, "-m", "switchyard", "up",
        "--port", str(port),
        "--controller-port", str(controller_port),
        "--engine-base-port", str(free_port()),
        "--engine-base-metrics-port", str(free_port()),
        "--served-model-name", "bench",
        "--data-dir", str(args.data_dir),
        "--device", args.device,
        "--dtype", args.dtype,
    ]  # fmt: skip
    if args.model:
        argv += ["--model", args.model]
    if args.api_key:
        argv += ["--api-key", args.api_key]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while "Switchyard is serving" not in log_path.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_stack(process)
            raise SystemExit(f"switchyard up did not come up:\n{log_path.read_text()}")
        time.sleep(0.3)
    return process, f"http://127.0.0.1:{port}", f"127.0.0.1:{controller_port}"


def stop_stack(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def first_ready_engine(controller: str) -> common_pb2.Replica:
    with grpc.insecure_channel(controller) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        listed = stub.ListReplicas(controller_pb2.ListReplicasRequest(), timeout=10)
    for replica in listed.replicas:
        if replica.state == common_pb2.REPLICA_STATE_READY:
            return replica
    raise SystemExit(f"no READY engine at controller {controller}")


def tokenizer_path(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from switchyard.demo import ensure_demo_model

    return str(ensure_demo_model(args.data_dir))


# -- main ------------------------------------------------------------------------------------


async def measure(
    args: argparse.Namespace, url: str, controller: str, limited_url: str | None = None
) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path(args))
    rng, shuffle_rng = random.Random(args.seed), random.Random(args.seed + 1)
    rounds = [make_prompts(tokenizer, rng, shuffle_rng, args.num_requests, args.prompt_words)]
    offsets, clock = [], 0.0
    for _ in range(3 * args.num_requests):  # interleaved: every path's arrivals in one schedule
        offsets.append(clock)
        clock += rng.expovariate(args.rate)
    for _ in range(1, args.rounds):  # fresh prompts: a round must not hit the last one's cache
        rounds.append(
            make_prompts(tokenizer, rng, shuffle_rng, args.num_requests, args.prompt_words)
        )
    warmup = make_prompts(tokenizer, rng, shuffle_rng, args.warmup, args.prompt_words)
    idle_prompts = make_prompts(tokenizer, rng, shuffle_rng, args.idle_pairs, args.prompt_words)
    limited_rounds = [
        make_prompts(tokenizer, rng, shuffle_rng, args.num_requests, args.prompt_words)
        for _ in rounds
    ] if limited_url is not None else [[] for _ in rounds]  # fmt: skip

    engine = first_ready_engine(controller)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=600, headers=headers) as plain:
        model = (await plain.get(f"{url}/v1/models")).json()["data"][0]["id"]
    http = http_client(args.client, url, headers)
    try:
        channel = grpc.aio.insecure_channel(engine.address)
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        for prompt in warmup:  # both paths, so that neither pays first-call costs
            await through_gateway(http, model, prompt.text, args.max_tokens, len(prompt.token_ids))
            await direct_to_engine(stub, prompt.direct_token_ids, args.max_tokens)
        limited_http = http_client(
            args.client, limited_url or url, {"Authorization": f"Bearer {BENCH_KEY}"}
        )
        if limited_url is not None:
            for prompt in warmup:
                await through_gateway(
                    limited_http, model, prompt.text, args.max_tokens, len(prompt.token_ids),
                )  # fmt: skip

        # The gateway's own cost, measured where nothing queues: one request at a time,
        # each gateway request beside its direct twin, the order alternating.
        idle_gateway, idle_direct = PathResult(), PathResult()
        for k, prompt in enumerate(idle_prompts):
            pair = [
                (idle_gateway, through_gateway(
                    http, model, prompt.text, args.idle_max_tokens, len(prompt.token_ids)
                )),
                (idle_direct, direct_to_engine(
                    stub, prompt.direct_token_ids, args.idle_max_tokens
                )),
            ]  # fmt: skip
            for result, call in pair if k % 2 == 0 else pair[::-1]:
                t0 = time.perf_counter()
                try:
                    sample = await call
                    sample.slot = (-1, k)
                    result.samples.append(sample)
                except Exception as exc:
                    result.errors.append(f"{type(exc).__name__}: {exc}")
                result.wall_s += time.perf_counter() - t0

        gateway, direct, limited = PathResult(), PathResult(), PathResult()
        for number, prompts in enumerate(rounds):

            async def via_gateway(i: int, prompts: list[Prompt] = prompts) -> Sample:
                prompt = prompts[i]
                return await through_gateway(
                    http, model, prompt.text, args.max_tokens, len(prompt.token_ids)
                )

            async def via_engine(i: int, prompts: list[Prompt] = prompts) -> Sample:
                return await direct_to_engine(stub, prompts[i].direct_token_ids, args.max_tokens)

            async def via_limited(i: int, prompts: list[Prompt] = limited_rounds[number]) -> Sample:
                # The third path's own prompts: the others' would hit the prefix cache.
                assert limited_url is not None
                prompt = prompts[i]
                return await through_gateway(
                    limited_http, model, prompt.text, args.max_tokens, len(prompt.token_ids),
                )  # fmt: skip

            runs = [(via_gateway, gateway), (via_engine, direct)]
            if limited_url is not None:
                runs.append((via_limited, limited))
            # Rounds rotate which path goes first (or takes the first of each group of
            # arrivals), so that drift (other load, the engine's state) weighs on all alike.
            shift = number % len(runs)
            runs = runs[shift:] + runs[:shift]
            if args.sequential:
                for send, result in runs:
                    await run_schedule(offsets[: args.num_requests], send, result)
            else:
                await run_interleaved(offsets[: len(runs) * args.num_requests], runs, number)
        await channel.close()
        await limited_http.aclose()
    finally:
        await http.aclose()

    gateway_summary, direct_summary = gateway.summary(), direct.summary()
    idle_gateway_summary, idle_direct_summary = idle_gateway.summary(), idle_direct.summary()
    limits: dict[str, Any] = {}
    if limited_url is not None:
        limited_summary = limited.summary()
        limits = {
            "gateway_limits": limited_summary,
            "limits_overhead_ms_p50": limited_summary["ttft_ms_p50"]
            - gateway_summary["ttft_ms_p50"],
            "limits_ttft_ratio_p50": limited_summary["ttft_ms_p50"]
            / gateway_summary["ttft_ms_p50"],
        }
    return {
        "config": {
            "url": url,
            "engine": engine.address,
            "model": model,
            "rate_rps": args.rate,
            "num_requests": args.num_requests,
            "rounds": args.rounds,
            "method": "sequential" if args.sequential else "interleaved",
            "client": args.client,
            "prompt_tokens_mean": statistics.fmean(
                len(p.token_ids) for prompts in rounds for p in prompts
            ),
            "max_tokens": args.max_tokens,
            "idle_pairs": args.idle_pairs,
            "idle_max_tokens": args.idle_max_tokens,
            "seed": args.seed,
        },
        "gateway": gateway_summary,
        "direct": direct_summary,
        "gateway_idle": idle_gateway_summary,
        "direct_idle": idle_direct_summary,
        "gateway_overhead_ms_p50": idle_gateway_summary["ttft_ms_p50"]
        - idle_direct_summary["ttft_ms_p50"],
        "gateway_overhead_ms_p50_se": overhead_standard_error_ms(idle_gateway, idle_direct),
        "gateway_overhead_paired_ms_p50": paired_overhead_ms_p50(idle_gateway, idle_direct),
        "gateway_overhead_ms_p99": idle_gateway_summary["ttft_ms_p99"]
        - idle_direct_summary["ttft_ms_p99"],
        "gateway_overhead_loaded_ms_p50": gateway_summary["ttft_ms_p50"]
        - direct_summary["ttft_ms_p50"],
        "gateway_overhead_loaded_paired_ms_p50": paired_overhead_ms_p50(gateway, direct),
        "gateway_overhead_loaded_ms_p99": gateway_summary["ttft_ms_p99"]
        - direct_summary["ttft_ms_p99"],
        **limits,
        "errors": {
            "gateway": (idle_gateway.errors + gateway.errors)[:10],
            "direct": (idle_direct.errors + direct.errors)[:10],
            "gateway_limits": limited.errors[:10],
        },
    }


def print_table(report: dict[str, Any]) -> None:
    rows = [
        ("requests ok", "requests", "{:.0f}"),
        ("errors", "errors", "{:.0f}"),
        ("TTFT p50 (ms)", "ttft_ms_p50", "{:.1f}"),
        ("TTFT p99 (ms)", "ttft_ms_p99", "{:.1f}"),
        ("ITL p50 (ms)", "itl_ms_p50", "{:.2f}"),
        ("ITL p99 (ms)", "itl_ms_p99", "{:.2f}"),
        ("E2E p50 (ms)", "e2e_ms_p50", "{:.1f}"),
        ("E2E p99 (ms)", "e2e_ms_p99", "{:.1f}"),
        ("requests/s", "requests_per_s", "{:.2f}"),
        ("output tokens/s", "output_tokens_per_s", "{:.1f}"),
    ]
    config = report["config"]
    print(
        f"\n{config['rounds']} x {config['num_requests']} requests at {config['rate_rps']} req/s "
        "(Poisson), "
        f"~{config['prompt_tokens_mean']:.0f} prompt tokens, {config['max_tokens']} output tokens"
    )
    limited = report.get("gateway_limits")
    print(
        f"{'metric':<18}{'gateway':>12}{'engine direct':>16}"
        + (f"{'gateway+limits':>16}" if limited else "")
    )
    for label, key, fmt in rows:
        gateway, direct = report["gateway"][key], report["direct"][key]
        extra = f"{fmt.format(limited[key]):>16}" if limited else ""
        print(f"{label:<18}{fmt.format(gateway):>12}{fmt.format(direct):>16}{extra}")
    idle = report["config"]["idle_pairs"]
    print(
        f"gateway overhead, TTFT p50, {idle} pairs one at a time: "
        f"{report['gateway_overhead_ms_p50']:.1f} ms "
        f"(standard error {report['gateway_overhead_ms_p50_se']:.1f} ms; TTFT p50 {report['gateway_idle']['ttft_ms_p50']:.1f} ms through the gateway, "
        f"{report['direct_idle']['ttft_ms_p50']:.1f} ms direct; median of paired differences "
        f"{report['gateway_overhead_paired_ms_p50']:.1f} ms)"
    )
    print(
        f"gateway overhead, TTFT p50, under the schedule above: "
        f"{report['gateway_overhead_loaded_ms_p50']:.1f} ms "
        f"(median of paired differences: {report['gateway_overhead_loaded_paired_ms_p50']:.1f} ms)"
    )
    if limited:
        print(
            f"rate limits (Redis) overhead, TTFT p50: {report['limits_overhead_ms_p50']:.1f} ms "
            f"(ratio {report['limits_ttft_ratio_p50']:.3f})"
        )
    for path, errors in report["errors"].items():
        for error in errors:
            print(f"{path} error: {error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running gateway (default: start the stack)")
    parser.add_argument("--controller", help="its controller host:port (with --url)")
    parser.add_argument("--model", help="checkpoint folder or hub id (default: the demo)")
    parser.add_argument("--api-key", default=os.environ.get("SWITCHYARD_API_KEY", ""))
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second")
    parser.add_argument("--num-requests", type=int, default=64, help="per path and round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds of every path, rotating which goes first; samples are pooled",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="per round, all of one path then all of the other (the old method), instead of "
        "interleaving them in one schedule",
    )
    parser.add_argument("--prompt-words", type=int, default=64)
    parser.add_argument(
        "--client",
        choices=("light", "httpx"),
        default="light",
        help="HTTP client of the gateway path: a socket-level one as light as the direct "
        "path's gRPC stub (default), or httpx with its own per-request cost",
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--idle-pairs",
        type=int,
        default=640,
        help="requests per path sent one at a time, before the schedule, for "
        "gateway_overhead_ms_p50 (the gateway's own cost where nothing queues; 160 gave the "
        "figure a standard error of 0.7-3.6 ms on a 2-core host, the engine's own jitter)",
    )
    parser.add_argument(
        "--idle-max-tokens",
        type=int,
        default=4,
        help="output tokens of those requests (their TTFT is what counts)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="engine device when starting the stack")
    parser.add_argument("--dtype", default="auto", help="engine dtype when starting the stack")
    parser.add_argument("--data-dir", type=Path, help="stack data dir (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument(
        "--limits",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure a gateway with rate limits on (default: when starting the stack)",
    )
    parser.add_argument("--plot", type=Path, help="draw the latencies into this PNG")
    args = parser.parse_args(argv)
    if bool(args.url) != bool(args.controller):
        parser.error("--url and --controller go together")

    process = None
    limited: LimitedGateway | None = None
    with tempfile.TemporaryDirectory(prefix="switchyard-bench-") as tmp:
        args.data_dir = args.data_dir or Path(tmp)
        try:
            if args.url:
                url, controller = args.url.rstrip("/"), args.controller
            else:
                process, url, controller = start_stack(args, Path(tmp) / "up.log")
            if args.limits if args.limits is not None else not args.url:
                limited = start_limited_gateway(
                    controller, tokenizer_path(args), "bench", args.data_dir,
                    Path(tmp) / "limited-gateway.log",
                )  # fmt: skip
                if limited is None:
                    print("no redis-server binary: the limits path is skipped")
            report = asyncio.run(measure(args, url, controller, limited.url if limited else None))
        finally:
            if limited is not None:
                limited.stop()
            if process is not None:
                stop_stack(process)
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        from plots import save, serving_figure

        save(serving_figure(report, platform.platform()), args.plot)
        print(f"wrote {args.plot}")
    return 1 if any(report["errors"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
