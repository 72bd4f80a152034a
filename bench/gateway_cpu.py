"""The gateway's own CPU per request, and its time to the first event, two versions side by side.

    python bench/gateway_cpu.py [--compare-source DIR] [--requests N] [--prefill-ms MS]
                                [--json PATH]

Starts the engine double of ``bench/gateway_hop.py`` (a real ``EngineService`` gRPC server
that answers at once, or ``--prefill-ms`` after the request) and a gateway routed to it
(``python -m gateway --engines``, the demo model's tokenizer, log level INFO so that the
per-request log line is paid as in production); with ``--compare-source DIR`` a second
gateway run from another source tree serves the same double. Then it sends the requests of
``bench/serving.py``'s one-at-a-time phase (a streamed ``/v1/completions`` of a 64-word prompt,
4 tokens, usage included), ``--gap-ms`` apart, alternating between the gateways, which one
goes first alternating too, and records for each request:

- ``cpu``: the CPU time of the gateway's whole process (every thread, from
  ``/proc/PID/task/*/schedstat``, in ns) from just before the request to just before that
  gateway's next one, so that what a request leaves to run after its last byte (a log line,
  a closed call) is counted with it;
- ``first``: the time to the first event with text, read from the socket by hand.

Reports the medians per gateway and, with two, the medians of the paired differences (this
tree minus the other), which a shared machine's drifting load moves far less than the
difference of two medians. On a 2-core host one run of 500 requests moves by about ±50-80 µs
of CPU between repeats of the same two trees; a change smaller than that needs several runs.
Linux only (``/proc``). Prints a table, writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.gateway_hop import RawClient, free_port, wait_for  # noqa: E402
from switchyard.settings import default_data_dir  # noqa: E402

WORDS = ("signal", "track", "yard", "switch", "freight", "engine", "siding", "junction")
PROMPT = " ".join(WORDS * 8)
MAX_TOKENS = 4


def process_cpu_ns(pid: int) -> int:
    """CPU time of every thread of process ``pid`` so far, in ns."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                total += int(stat.read().split()[0])
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return total


def streamed_completion() -> dict[str, Any]:
    """The body of ``bench/serving.py``'s one-at-a-time requests."""
    return {
        "model": "bench",
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def measure(args: argparse.Namespace, gateways: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """``gateways``: name -> (port, pid)."""
    clients = {name: RawClient(port, streamed_completion()) for name, (port, _) in gateways.items()}
    for client in clients.values():
        await client.open()
    names = list(gateways)
    cpu: dict[str, list[float]] = {name: [] for name in names}
    first: dict[str, list[float]] = {name: [] for name in names}
    last: dict[str, int | None] = {name: None for name in names}
    for number in range(args.warmup + args.requests + 1):
        for name in names if number % 2 == 0 else names[::-1]:
            now = process_cpu_ns(gateways[name][1])
            previous = last[name]
            if previous is not None and number > args.warmup:
                cpu[name].append((now - previous) / 1000)
            last[name] = now
            if number == args.warmup + args.requests:
                continue  # only closes the last request's CPU window
            seconds = await clients[name].first_text_s()
            if number >= args.warmup:
                first[name].append(seconds * 1e6)
            await asyncio.sleep(args.gap_ms / 1000)
    paths = {
        name: {
            "cpu_us_p50": statistics.median(cpu[name]),
            "cpu_us_mean": statistics.fmean(cpu[name]),
            "first_us_p50": statistics.median(first[name]),
        }
        for name in names
    }
    report: dict[str, Any] = {"paths": paths}
    if len(names) == 2:
        this, other = names
        report["paired_cpu_us_p50"] = statistics.median(
            a - b for a, b in zip(cpu[this], cpu[other], strict=True)
        )
        report["paired_first_us_p50"] = statistics.median(
            a - b for a, b in zip(first[this], first[other], strict=True)
        )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="per gateway")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--gap-ms", type=float, default=3.0, help="idle time after each request")
    parser.add_argument(
        "--prefill-ms",
        type=float,
        default=0.0,
        help="the engine double's time to its first token (0: at once)",
    )
    parser.add_argument(
        "--compare-source",
        type=Path,
        help="another source tree whose gateway serves the same engine, requests alternated",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="where the demo model's tokenizer is (built there on first use)",
    )
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)

    engine_port = free_port()
    engine = subprocess.Popen(
        [
            sys.executable, str(REPO_ROOT / "bench" / "gateway_hop.py"),
            "--serve-engine", str(engine_port),
            "--prefill-ms", str(args.prefill_ms),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    processes = [engine]
    trees = {"this": REPO_ROOT}
    if args.compare_source:
        trees["other"] = args.compare_source.resolve()
    gateways: dict[str, tuple[int, int]] = {}
    started: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, tree in trees.items():
            port = free_port()
            gateway = subprocess.Popen(
                [
                    sys.executable, "-m", "gateway",
                    "--engines", f"127.0.0.1:{engine_port}",
                    "--host", "127.0.0.1",
                    "--port", str(port),
                    "--model", "demo",
                    "--served-model-name", "bench",
                    "--data-dir", str(args.data_dir),
                    "--log-level", "INFO",
                ],
                cwd=tree,
                env={**os.environ, "PYTHONPATH": str(tree)},
                stderr=subprocess.DEVNULL,  # a log line per request
            )  # fmt: skip
            processes.append(gateway)
            started[name] = gateway
            gateways[name] = (port, gateway.pid)
        for name, (port, _) in gateways.items():
            wait_for(f"http://127.0.0.1:{port}/health", started[name])
        load_before = os.getloadavg()[0]
        report = asyncio.run(measure(args, gateways))
        load_after = os.getloadavg()[0]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
    report = {
        "config": {
            "requests": args.requests,
            "gap_ms": args.gap_ms,
            "prefill_ms": args.prefill_ms,
            "max_tokens": MAX_TOKENS,
            "prompt_words": len(PROMPT.split()),
            "compare_source": str(args.compare_source) if args.compare_source else None,
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": [round(load_before, 2), round(load_after, 2)],
        },
        **report,
    }
    print(f"\n{args.requests} requests per gateway, one at a time, {MAX_TOKENS} tokens each")
    print(f"{'gateway':<34}{'CPU p50':>12}{'CPU mean':>12}{'first text p50':>17}")
    labels = {"this": f"this tree ({REPO_ROOT.name})", "other": f"{args.compare_source}"}
    for name, figures in report["paths"].items():
        print(
            f"{labels[name]:<34}{figures['cpu_us_p50']:>9.0f} µs{figures['cpu_us_mean']:>9.0f} µs"
            f"{figures['first_us_p50']:>14.0f} µs"
        )
    if "paired_cpu_us_p50" in report:
        print(
            f"this minus the other, paired p50: CPU {report['paired_cpu_us_p50']:+.0f} µs, "
            f"first text {report['paired_first_us_p50']:+.0f} µs"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
