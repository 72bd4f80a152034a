"""Prefill/decode disaggregation: what a KV hand-off costs, and what it buys.

    python bench/pd.py [--preset small] [--json PATH]          # CPU: a few minutes
    python bench/pd.py --device cuda --preset llama-3.1-8b --json bench/results/pd-h200.json

Engines run as real processes (``python -m engine_service``, one torch thread each on the
CPU), on a random-weight Llama-shaped checkpoint; requests go through the gateway's own
router and engine client (:class:`gateway.engine_client.EngineClient`), as a gateway would
send them.

(a) **Hand-off over prefill.** One prefill and one decode engine. For each prompt length
    (512 .. 8192 tokens) the decode engine runs requests of one output token whose prompt a
    prefill engine computes; from the decode engine's metrics per request: the prefill time
    the prefill engine reports (admission to first token, its chunks exported as they
    finish), the time the hand-off added on top of it (``switchyard:kv_transfer_seconds``:
    the decode engine's wait from its Prefill call to the KV being in its blocks, minus the
    prefill time), and the bytes. ``transfer_over_prefill_<len>`` is the hand-off time over
    the prefill time. The reference beside it is the same prompt computed by the decode
    engine itself (``ttft_colocated_<len>`` against ``ttft_pd_<len>``).
(b) **Mixed workload.** Short chats decode continuously (a closed loop of users) while
    long prompts arrive at a fixed rate. The same hardware serves it twice: two ordinary
    engines behind the least-load router (colocated), then one prefill plus one decode
    engine (disaggregated). ``itl_p99_colocated_over_pd`` is the chats' p99 inter-token
    latency colocated over disaggregated, ``ttft_p50_colocated_over_pd`` the same for the
    p50 time to first token of every request (above 1: disaggregation is better).

Prints a table and writes JSON with ``--json``; add ``gpu_check`` rows with ``--device cuda``
on two GPUs (each engine gets its own: ``CUDA_VISIBLE_DEVICES`` 0 and 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import PRESETS, make_checkpoint

from gateway.engine_client import EngineClient
from gateway.route_sources import StaticRoutes
from gateway.routing import LeastLoadPolicy, RequestInfo, Router
from switchyard.v1 import common_pb2, engine_pb2, engine_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
BLOCK = 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(slots=True)
class EngineProcess:
    address: str
    metrics_url: str
    process: subprocess.Popen[bytes]
    log: Path

    def metric_sum(self, name: str) -> float:
        """The value of an unlabelled-but-model histogram/counter sample ``name``."""
        text = httpx.get(self.metrics_url, timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if re.match(rf"{re.escape(name)}(\{{|\s)", line):
                total += float(line.rsplit(" ", 1)[1])
        return total


def start_engine(
    checkpoint: Path, args, role: str, work: Path, gpu: int | None, **flags
) -> EngineProcess:
    port, metrics_port = free_port(), free_port()
    argv = [
        sys.executable, "-m", "engine_service",
        "--model", str(checkpoint),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--metrics-port", str(metrics_port),
        "--controller-address", "",
        "--role", role,
        "--device", args.device,
        "--dtype", args.dtype,
        "--block-size", str(BLOCK),
        "--max-model-len", str(args.max_model_len),
        "--num-kv-blocks", str(args.num_kv_blocks),
        "--log-level", "WARNING",
        *[x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    log = work / f"{role}-{port}.log"
    process = subprocess.Popen(
        argv, cwd=REPO_ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    engine = EngineProcess(
        f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", process, log
    )
    deadline = time.monotonic() + 600
    with grpc.insecure_channel(engine.address) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"engine exited:\n{log.read_text()[-3000:]}")
            try:
                stub.GetStats(engine_pb2.GetStatsRequest(), timeout=2)
                return engine
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


@contextlib.contextmanager
def engines(checkpoint: Path, args, work: Path, roles: list[str], **flags) -> Iterator[list]:
    started: list[EngineProcess] = []
    try:
        for i, role in enumerate(roles):
            gpu = i if args.device == "cuda" else None
            started.append(start_engine(checkpoint, args, role, work, gpu, **flags))
        yield started
    finally:
        for engine in started:
            engine.process.terminate()
        for engine in started:
            try:
                engine.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                engine.process.kill()


class Client:
    """The gateway's router and engine client over a fixed list of engines."""

    def __init__(self, addresses: list[str], pd_min_prompt_tokens: int) -> None:
        self.source = StaticRoutes(addresses, poll_interval_s=0.5)
        self.router = Router(self.source, LeastLoadPolicy())
        from prometheus_client import CollectorRegistry, Counter

        retries = Counter("retries", "", registry=CollectorRegistry())
        self.engines = EngineClient(
            self.router, retries, timeout_s=600, pd_min_prompt_tokens=pd_min_prompt_tokens
        )
        self._ids = iter(range(1 << 62))

    async def __aenter__(self) -> Client:
        await self.source.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.engines.close()
        await self.source.close()

    async def run(self, prompt: list[int], max_tokens: int) -> tuple[float, list[float], int]:
        """Time to first token, the per-token gaps after it, and the tokens received."""
        request_id = f"b{next(self._ids)}"
        request = engine_pb2.GenerateRequest(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling=common_pb2.SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True
            ),
        )
        info = RequestInfo(request_id=request_id, model="bench", prompt_token_ids=prompt)
        start = time.perf_counter()
        ttft = 0.0
        gaps: list[float] = []
        last = None
        received = 0
        async for response in self.engines.generate(request, info):
            now = time.perf_counter()
            if response.token_ids:
                if last is None:
                    ttft = now - start
                else:
                    gaps.extend([(now - last) / len(response.token_ids)] * len(response.token_ids))
                last = now
                received += len(response.token_ids)
        return ttft, gaps, received


def prompt_of(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


# -- (a) hand-off over prefill --------------------------------------------------------------


async def handoff_lengths(args, prefill: EngineProcess, decode: EngineProcess, vocab: int) -> dict:
    rng = random.Random(1)
    rows: dict[str, dict] = {}
    async with (
        Client([prefill.address, decode.address], pd_min_prompt_tokens=1) as pd,
        Client([decode.address], pd_min_prompt_tokens=1 << 30) as alone,
    ):
        await pd.run(prompt_of(rng, vocab, 256), 1)  # warm-up: first calls, allocations
        await alone.run(prompt_of(rng, vocab, 256), 1)
        for length in args.lengths:
            samples = []
            for _ in range(args.reps):
                before = [
                    decode.metric_sum(n)
                    for n in (
                        "switchyard:kv_transfer_seconds_sum",
                        "switchyard:kv_transfer_prefill_seconds_sum",
                        "switchyard:kv_transfer_bytes_sum",
                        "switchyard:kv_transfers_total",
                    )
                ]
                ttft_pd, _, _ = await pd.run(prompt_of(rng, vocab, length), 1)
                after = [
                    decode.metric_sum(n)
                    for n in (
                        "switchyard:kv_transfer_seconds_sum",
                        "switchyard:kv_transfer_prefill_seconds_sum",
                        "switchyard:kv_transfer_bytes_sum",
                        "switchyard:kv_transfers_total",
                    )
                ]
                handoff_s, prefill_s, num_bytes, done = (a - b for a, b in zip(after, before))
                if done != 1 or prefill_s <= 0:
                    raise RuntimeError(f"the hand-off of a {length}-token prompt did not happen")
                ttft_colocated, _, _ = await alone.run(prompt_of(rng, vocab, length), 1)
                samples.append((handoff_s, prefill_s, num_bytes, ttft_pd, ttft_colocated))
            med = [statistics.median(column) for column in zip(*samples)]
            rows[str(length)] = {
                "handoff_s": med[0],
                "prefill_s": med[1],
                "bytes": int(med[2]),
                "ttft_pd_s": med[3],
                "ttft_colocated_s": med[4],
                "transfer_over_prefill": med[0] / med[1],
            }
    return rows


# -- (b) mixed workload ---------------------------------------------------------------------


@dataclass(slots=True)
class Mixed:
    ttfts: list[float] = field(default_factory=list)
    chat_gaps: list[float] = field(default_factory=list)
    long_ttfts: list[float] = field(default_factory=list)
    chat_tokens: int = 0


async def mixed_workload(args, client: Client, vocab: int) -> Mixed:
    rng = random.Random(7)
    result = Mixed()
    stop_at = time.perf_counter() + args.duration

    async def chat_user(seed: int) -> None:
        user_rng = random.Random(seed)
        while time.perf_counter() < stop_at:
            ttft, gaps, n = await client.run(
                prompt_of(user_rng, vocab, args.chat_prompt), args.chat_tokens
            )
            result.ttfts.append(ttft)
            result.chat_gaps.extend(gaps)
            result.chat_tokens += n

    async def long_prompt() -> None:
        ttft, _, _ = await client.run(prompt_of(rng, vocab, args.long_prompt), args.long_tokens)
        result.ttfts.append(ttft)
        result.long_ttfts.append(ttft)

    longs = []
    users = [asyncio.create_task(chat_user(s)) for s in range(args.chat_users)]
    await asyncio.sleep(args.long_every / 2)
    while time.perf_counter() < stop_at:
        longs.append(asyncio.create_task(long_prompt()))
        await asyncio.sleep(args.long_every)
    await asyncio.gather(*users, *longs)
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def mixed_pair(args, checkpoint: Path, work: Path, vocab: int) -> dict:
    figures = {}
    for name, roles in (("colocated", ["both", "both"]), ("pd", ["prefill", "decode"])):
        with engines(checkpoint, args, work, roles) as started:
            addresses = [e.address for e in started]
            async with Client(addresses, pd_min_prompt_tokens=args.pd_min_prompt_tokens) as c:
                await c.run(prompt_of(random.Random(0), vocab, 64), 2)  # warm-up
                mixed = await mixed_workload(args, c, vocab)
            handoff = {}
            if name == "pd":  # where the long prompts' time went, from the decode engine
                decode = started[1]
                count = decode.metric_sum("switchyard:kv_transfer_seconds_count") or 1
                handoff = {
                    "handoffs": int(decode.metric_sum("switchyard:kv_transfer_seconds_count")),
                    "mean_prefill_s": decode.metric_sum(
                        "switchyard:kv_transfer_prefill_seconds_sum"
                    )
                    / count,
                    "mean_handoff_s": decode.metric_sum("switchyard:kv_transfer_seconds_sum")
                    / count,
                }
        figures[name] = {
            **handoff,
            "itl_p50_s": percentile(mixed.chat_gaps, 0.5),
            "itl_p99_s": percentile(mixed.chat_gaps, 0.99),
            "ttft_p50_s": percentile(mixed.ttfts, 0.5),
            "long_ttft_p50_s": percentile(mixed.long_ttfts, 0.5),
            "requests": len(mixed.ttfts),
            "chat_tokens": mixed.chat_tokens,
        }
    return figures


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine (CPU)")
    parser.add_argument("--parts", default="a,b")
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--duration", type=float, default=40.0, help="(b): seconds per stack")
    parser.add_argument("--chat-users", type=int, default=4)
    parser.add_argument("--chat-prompt", type=int, default=64)
    parser.add_argument("--chat-tokens", type=int, default=48)
    parser.add_argument("--long-prompt", type=int, default=2048)
    parser.add_argument("--long-tokens", type=int, default=4)
    parser.add_argument("--long-every", type=float, default=6.0)
    parser.add_argument("--pd-min-prompt-tokens", type=int, default=256)
    parser.add_argument("--num-kv-blocks", type=int, default=1200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.max_model_len = max([*args.lengths, args.long_prompt]) + 64
    torch.set_num_threads(1)
    parts = set(args.parts.split(","))
    vocab = PRESETS[args.preset]["vocab_size"]

    result: dict = {
        "preset": args.preset,
        "device": args.device,
        "dtype": args.dtype,
        "threads_per_engine": args.threads,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = work / "ckpt"
        # Room for the longest prompt and its output, whatever the preset's own limit.
        preset = PRESETS[args.preset]
        preset["max_position_embeddings"] = max(
            preset["max_position_embeddings"], args.max_model_len
        )
        make_checkpoint(checkpoint, args.preset, getattr(torch, args.dtype), "cpu")
        if "a" in parts:
            with engines(checkpoint, args, work, ["prefill", "decode"]) as (prefill, decode):
                rows = asyncio.run(handoff_lengths(args, prefill, decode, vocab))
            result["handoff"] = rows
            for length, row in rows.items():
                result[f"transfer_over_prefill_{length}"] = row["transfer_over_prefill"]
                result[f"handoff_bytes_{length}"] = row["bytes"]
        if "b" in parts:
            mixed = asyncio.run(mixed_pair(args, checkpoint, work, vocab))
            result["mixed"] = mixed
            result["itl_p99_colocated_over_pd"] = (
                mixed["colocated"]["itl_p99_s"] / mixed["pd"]["itl_p99_s"]
            )
            result["ttft_p50_colocated_over_pd"] = (
                mixed["colocated"]["ttft_p50_s"] / mixed["pd"]["ttft_p50_s"]
            )
    report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def report(result: dict) -> None:
    print(f"# bench/pd.py: {result['preset']} on {result['device']} ({result['dtype']})")
    if "handoff" in result:
        print("\n(a) hand-off over prefill (1 prefill + 1 decode engine, TCP/gRPC)")
        print(
            f"{'prompt':>7} {'prefill s':>10} {'hand-off s':>11} {'ratio':>7} {'MiB':>8} "
            f"{'TTFT pd':>8} {'TTFT colo':>10}"
        )
        for length, row in result["handoff"].items():
            print(
                f"{length:>7} {row['prefill_s']:>10.3f} {row['handoff_s']:>11.4f} "
                f"{row['transfer_over_prefill']:>7.3f} {row['bytes'] / 2**20:>8.1f} "
                f"{row['ttft_pd_s']:>8.3f} {row['ttft_colocated_s']:>10.3f}"
            )
    if "mixed" in result:
        print("\n(b) mixed workload: 2 colocated engines vs 1 prefill + 1 decode")
        print(
            f"{'stack':>10} {'ITL p50':>8} {'ITL p99':>8} {'TTFT p50':>9} {'long TTFT':>10} {'reqs':>5}"
        )
        for name, row in result["mixed"].items():
            print(
                f"{name:>10} {row['itl_p50_s']:>8.4f} {row['itl_p99_s']:>8.4f} "
                f"{row['ttft_p50_s']:>9.4f} {row['long_ttft_p50_s']:>10.3f} {row['requests']:>5}"
            )
        pd = result["mixed"]["pd"]
        if pd.get("handoffs"):
            print(
                f"pd: {pd['handoffs']} hand-offs, mean prefill {pd['mean_prefill_s']:.3f} s, "
                f"mean hand-off {pd['mean_handoff_s']:.4f} s"
            )
        print(f"itl_p99_colocated_over_pd  = {result['itl_p99_colocated_over_pd']:.2f}")
        print(f"ttft_p50_colocated_over_pd = {result['ttft_p50_colocated_over_pd']:.2f}")


if __name__ == "__main__":
    main()
