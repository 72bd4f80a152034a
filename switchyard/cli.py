"""The ``switchyard`` command: run the whole stack locally, or one service, and operate a fleet.

``switchyard up``
    starts the KV service, the controller (which starts the engines through its local
    backend, pointed at the KV service), the tool service and the gateway as local
    processes, prints the URL once the gateway's ``/health`` answers 200, and stops
    everything on Ctrl-C or SIGTERM.
``switchyard scale engines N`` / ``switchyard status``
    talk to a running controller (``status`` also shows the KV service's hit rates).
``switchyard controller|engine|gateway|kv|tools [flags]``
    run one service in the foreground (``--help`` lists its settings).

Process hygiene in ``up``: the KV service, the controller, the tool service and the gateway
each run in their own process group (a terminal's Ctrl-C reaches ``up`` only, which stops
them in order), and every process of the stack, engines and MCP servers included, carries
``SWITCHYARD_UP_ID`` in its environment; whatever still carries it once those have stopped is
killed, so nothing outlives ``up``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading
import time
import typing
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

from switchyard.kv_client import KVClientSync
from switchyard.ports import PortChoice, PortTaken, choose_port, port_is_free
from switchyard.settings import CONFIG_ENV, GatewaySettings, default_data_dir
from switchyard.supervisor import Supervisor, describe_status
from switchyard.up_tools import (
    DEFAULT_TOOL_PORT,
    add_tool_arguments,
    gateway_tool_args,
    tool_service_argv,
)
from switchyard.v1 import common_pb2, controller_pb2, controller_pb2_grpc, kv_pb2

DEFAULT_CONTROLLER_PORT = 50051
DEFAULT_CONTROLLER_ADDRESS = f"127.0.0.1:{DEFAULT_CONTROLLER_PORT}"
DEFAULT_KV_PORT = 50060
DEFAULT_KV_METRICS_PORT = 9060
DEFAULT_ENGINE_BASE_PORT = 50100
DEFAULT_ENGINE_BASE_METRICS_PORT = 9100
DEFAULT_KV_ADDRESS = f"127.0.0.1:{DEFAULT_KV_PORT}"
UP_ID_ENV = "SWITCHYARD_UP_ID"
# The controller gives each engine 20 s to stop before SIGKILL; it needs a little beyond that.
CONTROLLER_STOP_TIMEOUT_S = 30.0
GATEWAY_STOP_TIMEOUT_S = 10.0
SERVICES = ("controller", "engine", "gateway", "kv", "tools")


# ---------------------------------------------------------------------------------------------
# switchyard up


def _processes_marked(up_id: str) -> list[int]:
    """Pids of this user's processes whose environment carries ``UP_ID_ENV=up_id``."""
    marker = f"{UP_ID_ENV}={up_id}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if marker in environ.split(b"\0"):
            found.append(pid)
    return found


def _kill_stragglers(up_id: str) -> list[int]:
    """SIGKILLs every process still marked with ``up_id``; returns their pids."""
    pids = _processes_marked(up_id)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _engine_args(args: argparse.Namespace) -> list[str]:
    engine_args = shlex.split(args.engine_args)
    knobs = {
        "--device": args.device,
        "--dtype": args.dtype,
        "--max-model-len": args.max_model_len,
        "--num-kv-blocks": args.num_kv_blocks,
        "--block-size": args.block_size,
        "--max-num-seqs": args.max_num_seqs,
        "--max-num-batched-tokens": args.max_num_batched_tokens,
        "--speculative-config": args.speculative_config,
        "--max-queued-requests": args.max_queued_requests,
        "--max-loras": args.max_loras,
        "--max-lora-rank": args.max_lora_rank,
        "--max-cpu-loras": args.max_cpu_loras,
        "--tensor-parallel-size": args.tensor_parallel_size,
        "--data-parallel-size": args.data_parallel_size,
    }
    for flag, value in knobs.items():
        if value is not None:
            engine_args += [flag, str(value)]
    if args.enable_lora or args.lora_modules:
        engine_args.append("--enable-lora")
    if args.lora_modules:
        engine_args += ["--lora-modules", *args.lora_modules]
    if args.enable_expert_parallel:
        engine_args.append("--enable-expert-parallel")
    return engine_args


GATEWAY_KNOBS = ("routing_policy", "chat_format", "tool_call_parser")


def _gateway_args(args: argparse.Namespace) -> list[str]:
    gateway_args = []
    for name in GATEWAY_KNOBS:
        value = getattr(args, name)
        if value is not None:
            gateway_args += ["--" + name.replace("_", "-"), value]
    return gateway_args


def _resolve_model(args: argparse.Namespace, data_dir: Path) -> str:
    if args.model is None:
        from switchyard.demo import DEMO_MODEL_NAME, ensure_demo_model

        print("No --model given: serving the built-in demo model (random weights, so its text is")
        print("random too). Building it on first use...", flush=True)
        path = ensure_demo_model(data_dir)
        print(f"Demo model: {path}", flush=True)
        return DEMO_MODEL_NAME
    local = Path(args.model).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise SystemExit(f"{local} is not a Hugging Face checkpoint folder (no config.json)")
        return str(local.resolve())
    return str(args.model)  # a hub id: engines and gateway download it through huggingface_hub


@dataclass(frozen=True, slots=True)
class StackPorts:
    """Where one local stack listens; see :func:`choose_stack_ports`."""

    gateway: int
    controller: int
    kv: int
    kv_metrics: int
    engine_base: int
    engine_base_metrics: int
    notes: tuple[str, ...]


def choose_stack_ports(args: argparse.Namespace) -> StackPorts:
    """The gateway's port must be free (``--port``, default 8000); every internal port takes
    its flag's value, which must be free, or else its default, or else a free port (with a
    note). Raises :class:`PortTaken` naming the flag."""
    local = "127.0.0.1"
    gateway = choose_port(args.host, "the gateway", "--port", args.port, 8000, fallback=False)
    wanted = (
        ("the controller", "--controller-port", args.controller_port, DEFAULT_CONTROLLER_PORT),
        ("the KV service", "--kv-port", args.kv_port, DEFAULT_KV_PORT),
        ("the KV service's metrics", "--kv-metrics-port", args.kv_metrics_port,
         DEFAULT_KV_METRICS_PORT),
    )  # fmt: skip
    internal: list[PortChoice] = []
    for what, flag, given, default in wanted:
        chosen = {gateway.port, *(choice.port for choice in internal)}
        internal.append(choose_port(local, what, flag, given, default, avoid=chosen))
    # Engines fall back port by port themselves (the controller's local backend); a base
    # given explicitly must be free to begin with.
    for flag, given in (
        ("--engine-base-port", args.engine_base_port),
        ("--engine-base-metrics-port", args.engine_base_metrics_port),
    ):
        if given is not None and not port_is_free(local, given):
            raise PortTaken(f"port {given} for the first engine ({flag} {given}) is taken")
    controller, kv, kv_metrics = (choice.port for choice in internal)
    return StackPorts(
        gateway=gateway.port,
        controller=controller,
        kv=kv,
        kv_metrics=kv_metrics,
        engine_base=args.engine_base_port or DEFAULT_ENGINE_BASE_PORT,
        engine_base_metrics=args.engine_base_metrics_port or DEFAULT_ENGINE_BASE_METRICS_PORT,
        notes=tuple(choice.note for choice in internal if choice.note),
    )


def stack_dir(data_dir: Path, gateway_port: int) -> Path:
    """The folder of the stack whose gateway listens on ``gateway_port``: its logs, the KV
    service's disk store, the controller's record of its engines. Two stacks on one machine
    differ by gateway port, so they never share one; the model cache stays shared."""
    return data_dir / "stacks" / f"port-{gateway_port}"


def _wait_ready(url: str, client: httpx.Client) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return client.get(url).status_code == 200
    return False


def cmd_up(args: argparse.Namespace) -> int:
    if args.engines is None:  # ordinary engines only when the stack is not disaggregated
        args.engines = 0 if args.prefill_engines or args.decode_engines else 1
    if args.prefill_engines and not args.decode_engines and not args.engines:
        print("--prefill-engines needs decode engines (--decode-engines)", file=sys.stderr)
        return 1
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    config_file = Path(args.config).expanduser().resolve() if args.config else None
    if config_file is not None and not config_file.is_file():
        print(f"settings file {config_file} does not exist", file=sys.stderr)
        return 1
    try:
        ports = choose_stack_ports(args)
    except PortTaken as exc:
        print(str(exc), file=sys.stderr)
        return 1
    try:
        taken = {ports.gateway, ports.controller, ports.kv, ports.kv_metrics}
        tools_choice = choose_port(
            "127.0.0.1", "the tool service", "--tool-port", args.tool_port, DEFAULT_TOOL_PORT,
            avoid=taken,
        )  # fmt: skip
    except PortTaken as exc:
        print(str(exc), file=sys.stderr)
        return 1
    tool_port = tools_choice.port
    for note in (*ports.notes, tools_choice.note):
        if note:
            print(note, flush=True)
    run_dir = stack_dir(data_dir, ports.gateway)
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)

    model = _resolve_model(args, data_dir)
    if stop.is_set():
        return 130
    up_id = uuid.uuid4().hex
    # The services import from the same tree as this command, whatever the working directory.
    source_root = str(Path(__file__).resolve().parents[1])
    python_path = [source_root, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, UP_ID_ENV: up_id, "PYTHONPATH": os.pathsep.join(python_path)}
    if config_file is not None:  # every service, engines included, reads its own section
        env[CONFIG_ENV] = str(config_file)
    controller_address = f"127.0.0.1:{ports.controller}"
    kv_address = f"127.0.0.1:{ports.kv}"
    tool_address = f"127.0.0.1:{tool_port}"
    engine_args = [*_engine_args(args), "--kv-service-address", kv_address]
    common = ["--data-dir", str(data_dir), "--log-level", args.log_level, "--model", model]
    if args.served_model_name:
        common += ["--served-model-name", args.served_model_name]
    controller_argv = [
        sys.executable, "-m", "controller",
        *common,
        "--run-dir", str(run_dir),
        "--host", "127.0.0.1",
        "--port", str(ports.controller),
        "--engines", str(args.engines),
        "--prefill-engines", str(args.prefill_engines),
        "--decode-engines", str(args.decode_engines),
        "--engine-base-port", str(ports.engine_base),
        "--engine-base-metrics-port", str(ports.engine_base_metrics),
        f"--engine-args={shlex.join(engine_args)}",
    ]  # fmt: skip
    kv_argv = [
        sys.executable, "-m", "kv_service",
        "--data-dir", str(data_dir),
        "--log-level", args.log_level,
        "--host", "127.0.0.1",
        "--port", str(ports.kv),
        "--metrics-port", str(ports.kv_metrics),
        "--kv-store", args.kv_store or f"disk:{run_dir / 'kv'}",
    ]  # fmt: skip
    gateway_argv = [
        sys.executable, "-m", "gateway",
        *common,
        "--host", args.host,
        "--port", str(ports.gateway),
        "--controller-address", controller_address,
        *(["--api-keys", ",".join(args.api_key)] if args.api_key else []),
        *_gateway_args(args),
        *gateway_tool_args(args, tool_address),
    ]  # fmt: skip

    def report(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    supervisor = Supervisor(log_dir, env, report=report)
    try:
        supervisor.start("kv", kv_argv, label="KV service")
        supervisor.start("controller", controller_argv)
        supervisor.start(
            "tools", tool_service_argv(args, data_dir, tool_port), label="tool service"
        )
        supervisor.start("gateway", gateway_argv)
        shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
        url = f"http://{shown_host}:{ports.gateway}"
        print(
            f"Starting {_engine_counts(args)}, the controller ({controller_address}), the KV "
            f"service ({kv_address}), the tool service ({tool_address}) and the gateway; "
            f"logs in {log_dir}",
            flush=True,
        )
        return _supervise(args, supervisor, url, model, stop)
    finally:
        print("Stopping...", flush=True)
        timeouts = {"controller": CONTROLLER_STOP_TIMEOUT_S}
        for name in supervisor.stop(timeouts, GATEWAY_STOP_TIMEOUT_S):
            print(f"{name} did not stop in time; killed it", file=sys.stderr)
        stragglers = _kill_stragglers(up_id)
        if stragglers:
            print(f"killed leftover processes {stragglers}", file=sys.stderr)
        print("Stopped.", flush=True)


def _engine_counts(args: argparse.Namespace) -> str:
    counts = [
        f"{n} {kind}"
        for n, kind in (
            (args.engines, "engine(s)"),
            (args.prefill_engines, "prefill engine(s)"),
            (args.decode_engines, "decode engine(s)"),
        )
        if n
    ]
    return ", ".join(counts) or "no engines"


def _supervise(
    args: argparse.Namespace, supervisor: Supervisor, url: str, model: str, stop: threading.Event
) -> int:
    """Waits for the gateway to serve, then keeps the services running until a signal; 0 on
    a signal, 1 when a service cannot start or the stack does not come up in time."""
    deadline = time.monotonic() + args.startup_timeout
    ready = False
    with httpx.Client(timeout=2.0) as client:
        while not stop.wait(0.25):
            failed = supervisor.poll()
            if failed is not None:
                print(
                    f"the {failed.name} cannot go on ({describe_status(failed.returncode)}; "
                    f"log: {failed.log_path}):",
                    file=sys.stderr,
                )
                print(failed.reason(), file=sys.stderr, flush=True)
                return 1
            if ready:
                continue
            if _wait_ready(f"{url}/health", client):
                ready = True
                print(f"Switchyard is serving {model} at {url}  (OpenAI base URL: {url}/v1)")
                if args.model is None:
                    print("This is the demo model: random weights, random text.")
                print("Ctrl-C stops everything.", flush=True)
            elif time.monotonic() > deadline:
                print(
                    f"{url}/health did not answer 200 within {args.startup_timeout:.0f} s",
                    file=sys.stderr,
                )
                return 1
    return 0


# ---------------------------------------------------------------------------------------------
# switchyard scale / status


def _controller_stub(address: str) -> controller_pb2_grpc.ControllerServiceStub:
    return controller_pb2_grpc.ControllerServiceStub(grpc.insecure_channel(address))


def cmd_scale(args: argparse.Namespace) -> int:
    reply = _controller_stub(args.controller).Scale(
        controller_pb2.ScaleRequest(pool=args.pool, replicas=args.replicas), timeout=10
    )
    print(f"{args.pool}: {reply.previous} -> {reply.desired}")
    return 0


def format_status(reply: controller_pb2.ListReplicasResponse) -> str:
    """The replicas as an aligned text table, preceded by the desired pool sizes.

    Hit rates are shares of the prompt tokens each replica was asked for: served from its
    device prefix cache, restored from its host-memory tier, or fetched from the KV service.
    SPEC ACCEPT (when a replica speculates) is its mean acceptance length: tokens committed
    per verification round.
    When a replica serves LoRA, ADAPTERS lists its adapters (``*``: in a device slot now,
    ``^``: placed on it by the controller) and ``n/m`` its device slots in use.
    """
    header = (
        "ID", "ADDRESS", "ROLE", "STATE", "RUNNING", "WAITING", "KV USAGE",
        "PREFIX HIT", "HOST HIT", "REMOTE HIT",
    )  # fmt: skip
    with_pd = any(r.role != common_pb2.REPLICA_ROLE_UNSPECIFIED for r in reply.replicas)
    if with_pd:
        header = (*header, "HANDOFFS", "HANDOFF MiB", "HANDOFF S")
    with_spec = any(r.load.spec_acceptance_length for r in reply.replicas)
    if with_spec:
        header = (*header, "SPEC ACCEPT")
    with_lora = any(r.max_loras for r in reply.replicas)
    if with_lora:
        header = (*header, "LORA SLOTS", "ADAPTERS")
    rows = [header]
    for replica in reply.replicas:
        state = common_pb2.ReplicaState.Name(replica.state).removeprefix("REPLICA_STATE_")
        load = replica.load
        rows.append(
            (
                replica.replica_id,
                replica.address or "-",
                _ROLE_NAMES.get(replica.role, "both"),
                state,
                str(load.num_running),
                str(load.num_waiting),
                f"{100 * load.kv_usage:.1f}%",
                f"{100 * load.prefix_hit_rate:.1f}%",
                _share(load.host_hit_tokens, load.prefix_cache_queries),
                _share(load.remote_hit_tokens, load.prefix_cache_queries),
                *(_handoff_cells(replica) if with_pd else ()),
                *((f"{load.spec_acceptance_length:.2f}",) if with_spec else ()),
                *(_lora_cells(replica) if with_lora else ()),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = (
        [", ".join(f"{pool}: {count} desired" for pool, count in sorted(reply.desired.items()))]
        if reply.desired
        else []
    )
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
              for row in rows]  # fmt: skip
    return "\n".join(lines)


_ROLE_NAMES = {common_pb2.REPLICA_ROLE_PREFILL: "prefill", common_pb2.REPLICA_ROLE_DECODE: "decode"}


def _handoff_cells(replica: common_pb2.Replica) -> tuple[str, str, str]:
    """KV hand-offs done (sent by a prefill engine, received by a decode engine), their
    bytes, and (decode engines) the time they added to the prefills in all."""
    load = replica.load
    seconds = f"{load.kv_handoff_seconds_total:.2f}" if load.kv_handoff_seconds_total else "-"
    return (
        str(load.kv_handoffs_total),
        f"{load.kv_handoff_bytes_total / 2**20:.1f}",
        seconds,
    )


def _lora_cells(replica: common_pb2.Replica) -> tuple[str, str]:
    if not replica.max_loras:
        return "-", "-"
    resident, placed = set(replica.adapters), set(replica.placed_adapters)
    names = [
        a.name + ("*" if a.name in resident else "") + ("^" if a.name in placed else "")
        for a in sorted(replica.lora_adapters, key=lambda a: a.name)
    ]
    return f"{len(resident)}/{replica.max_loras}", ",".join(names) or "-"


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0.0%"


def format_kv_stats(reply: kv_pb2.StatsResponse) -> str:
    """The KV service's store and, per tier, its hit rate and usage."""
    lines = [f"KV service ({reply.store}):"]
    for tier in reply.tiers:
        capacity = f" of {tier.capacity_bytes / 2**30:.2f} GiB" if tier.capacity_bytes else ""
        lines.append(
            f"  {tier.tier:<6}  hit {100 * tier.hit_rate:5.1f}%  ({tier.hits} hits, "
            f"{tier.misses} misses)  {tier.blocks} blocks, "
            f"{tier.bytes_used / 2**30:.2f} GiB{capacity}"
            + (f"  {tier.corrupt_blocks} corrupt" if tier.corrupt_blocks else "")
        )
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    reply = _controller_stub(args.controller).ListReplicas(
        controller_pb2.ListReplicasRequest(), timeout=10
    )
    print(format_status(reply))
    kv = KVClientSync(args.kv, timeout_s=2.0)
    try:
        kv_stats = kv.stats()
    finally:
        kv.close()
    if kv_stats is None:
        print(f"KV service at {args.kv}: not reachable ({kv.client.last_error or 'no answer'})")
        return 0
    print(format_kv_stats(kv_stats))
    return 0


# ---------------------------------------------------------------------------------------------
# the parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchyard", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    controller_default = os.environ.get("SWITCHYARD_CONTROLLER_ADDRESS", DEFAULT_CONTROLLER_ADDRESS)

    up = sub.add_parser("up", help="run controller, engines and gateway locally")
    up.add_argument("--model", help="local HF checkpoint folder or hub id (default: the demo)")
    up.add_argument("--served-model-name", default="", help="name clients use (default: model)")
    up.add_argument("--host", default="127.0.0.1", help="gateway bind address")
    up.add_argument("--port", type=int, help="gateway HTTP port (default: 8000)")
    up.add_argument(
        "--engines",
        type=_positive_int,
        default=None,
        help="ordinary engine replicas (default: 1, or 0 with prefill/decode engines)",
    )
    up.add_argument(
        "--prefill-engines",
        type=_positive_int,
        default=0,
        help="prefill engines: compute prompts and hand their KV to decode engines",
    )
    up.add_argument(
        "--decode-engines",
        type=_positive_int,
        default=0,
        help="decode engines: generate from prompts a prefill engine computed",
    )
    up.add_argument("--api-key", action="append", default=[], help="accepted API key (repeatable)")
    up.add_argument(
        "--data-dir",
        help="model cache, and each stack's logs and state under stacks/port-PORT "
        "(default: ~/.cache/switchyard)",
    )
    internal_ports = (
        ("--controller-port", "controller gRPC port", DEFAULT_CONTROLLER_PORT),
        ("--kv-port", "KV service gRPC port", DEFAULT_KV_PORT),
        ("--kv-metrics-port", "KV service metrics port", DEFAULT_KV_METRICS_PORT),
        ("--engine-base-port", "gRPC port of engine-0 (engine-k: +k)", DEFAULT_ENGINE_BASE_PORT),
        (
            "--engine-base-metrics-port",
            "metrics port of engine-0 (engine-k: +k)",
            DEFAULT_ENGINE_BASE_METRICS_PORT,
        ),
    )
    for flag, text, default in internal_ports:
        up.add_argument(
            flag, type=int, help=f"{text} (default: {default}, or a free port if it is taken)"
        )
    up.add_argument(
        "--kv-store", help="memory, disk:PATH or redis://HOST:PORT (default: disk under data dir)"
    )
    up.add_argument("--log-level", default="INFO")
    up.add_argument(
        "--config",
        help="YAML settings file with engine:, controller:, gateway: and kv: sections, read by "
        "every service; the flags up passes win over it",
    )
    up.add_argument("--startup-timeout", type=float, default=900.0, help="seconds")
    engine = up.add_argument_group("engine knobs (passed to every engine)")
    engine.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: auto)")
    engine.add_argument("--dtype", help="auto, float32, float16, bfloat16")
    engine.add_argument("--max-model-len", type=int)
    engine.add_argument("--num-kv-blocks", type=int)
    engine.add_argument("--block-size", type=int)
    engine.add_argument("--max-num-seqs", type=int)
    engine.add_argument("--max-num-batched-tokens", type=int)
    engine.add_argument(
        "--speculative-config",
        help='speculative decoding as vLLM\'s JSON, e.g. \'{"method": "ngram", '
        '"num_speculative_tokens": 4}\' or a draft "model"',
    )
    engine.add_argument(
        "--max-queued-requests",
        type=int,
        help="requests each engine keeps waiting before it refuses more (default: fits its KV pool)",
    )
    engine.add_argument(
        "--enable-lora", action="store_true", help="serve LoRA adapters (docs/lora.md)"
    )
    engine.add_argument(
        "--lora-modules",
        nargs="+",
        metavar="NAME=PATH",
        help='adapters to load: NAME=PATH or {"name": ..., "path": ..., "base_model_name": ...}',
    )
    engine.add_argument("--max-loras", type=int, help="adapters on the device at once")
    engine.add_argument("--max-lora-rank", type=int, help="highest adapter rank accepted")
    engine.add_argument("--max-cpu-loras", type=int, help="adapters kept in host memory")
    engine.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        help="ranks (GPUs) each engine splits the model across (docs/parallel.md)",
    )
    engine.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        help="data-parallel attention ranks of each engine, each with its own batch and KV "
        "cache (docs/parallel.md)",
    )
    engine.add_argument(
        "--enable-expert-parallel",
        action="store_true",
        help="MoE experts sharded across each engine's ranks, tokens exchanged all-to-all",
    )
    engine.add_argument("--engine-args", default="", help="more engine flags, as one string")
    gateway = up.add_argument_group("gateway knobs")
    for name in GATEWAY_KNOBS:
        field = GatewaySettings.model_fields[name]
        gateway.add_argument(
            "--" + name.replace("_", "-"),
            choices=typing.get_args(field.annotation),
            help=f"{field.description} (default: {field.default})",
        )
    add_tool_arguments(up)
    up.set_defaults(func=cmd_up)

    scale = sub.add_parser("scale", help="set the desired size of a pool")
    scale.add_argument("pool", choices=["engines", "prefill-engines", "decode-engines"])
    scale.add_argument("replicas", type=_positive_int)
    scale.add_argument("--controller", default=controller_default, help="host:port")
    scale.set_defaults(func=cmd_scale)

    status = sub.add_parser("status", help="list the replicas and their load")
    status.add_argument("--controller", default=controller_default, help="host:port")
    status.add_argument(
        "--kv",
        default=os.environ.get("SWITCHYARD_KV_SERVICE_ADDRESS", DEFAULT_KV_ADDRESS),
        help="KV service host:port",
    )
    status.set_defaults(func=cmd_status)

    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} service (see `switchyard {name} --help`)")
    return parser


def _run_service(name: str, argv: list[str]) -> int:
    if name == "controller":
        from controller.server import main as controller_main

        return controller_main(argv)
    if name == "engine":
        from engine_service.__main__ import main as engine_main

        engine_main(argv)
        return 0
    if name == "kv":
        from kv_service.__main__ import main as kv_main

        kv_main(argv)
        return 0
    if name == "tools":
        from tool_service.__main__ import main as tools_main

        tools_main(argv)
        return 0
    from gateway.__main__ import main as gateway_main

    gateway_main(argv)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SERVICES:
        return _run_service(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        name = code.name if code is not None else "ERROR"
        address = getattr(args, "controller", "?")
        print(f"controller at {address}: {name}: {details}", file=sys.stderr)
        return 1
