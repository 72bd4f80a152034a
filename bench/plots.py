"""Figures of the benchmarks' JSON results, drawn with matplotlib as PNG files.

    python bench/plots.py serving bench/results/serving.json --out docs/images/serving.png
    python bench/plots.py throughput a.json b.json --out docs/images/throughput.png
    python bench/plots.py hop before.json after.json --labels before,after --out hop.png

``bench/serving.py`` and ``bench/throughput.py`` also draw their figure themselves with
``--plot PATH``. Every figure shows Switchyard beside the reference measured in the same run
and names the machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

OURS, REFERENCE = "#1f6f8b", "#c9a227"


def serving_figure(report: dict[str, Any], machine: str = "") -> Figure:
    """TTFT, inter-token and end-to-end latency (p50 and p99), gateway beside engine direct."""
    metrics = [("TTFT", "ttft"), ("inter-token", "itl"), ("end-to-end", "e2e")]
    figure, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    for ax, (label, key) in zip(axes, metrics):
        positions = [0.0, 1.0]
        for offset, (path, color, name) in enumerate(
            [("gateway", OURS, "through the gateway"), ("direct", REFERENCE, "engine direct")]
        ):
            values = [report[path][f"{key}_ms_p50"], report[path][f"{key}_ms_p99"]]
            bars = ax.bar(
                [p + (offset - 0.5) * 0.38 for p in positions],
                values,
                0.38,
                color=color,
                label=name,
            )
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(positions, ["p50", "p99"])
        ax.set_title(f"{label} (ms)")
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].legend(frameon=False, fontsize=8)
    config = report["config"]
    figure.suptitle(
        f"Serving: {config['rounds']} x {config['num_requests']} requests at "
        f"{config['rate_rps']} req/s, {config['max_tokens']} output tokens; gateway overhead "
        f"(TTFT p50) {report['gateway_overhead_ms_p50']:.1f} ms"
        + (f"\n{machine}" if machine else ""),
        fontsize=10,
    )
    figure.tight_layout()
    return figure


def throughput_figure(results: list[dict[str, Any]]) -> Figure:
    """Output tokens per second, Switchyard beside ``transformers.generate``, per run."""
    figure, ax = plt.subplots(figsize=(max(5.0, 2.2 * len(results)), 3.6))
    for index, result in enumerate(results):
        ours = ax.bar(index - 0.2, result["ours_tok_s"], 0.38, color=OURS)
        ax.bar_label(ours, fmt="%.0f", fontsize=7)
        if result.get("hf_tok_s"):
            reference = ax.bar(index + 0.2, result["hf_tok_s"], 0.38, color=REFERENCE)
            ax.bar_label(reference, fmt="%.0f", fontsize=7)
            ax.annotate(
                f"{result['ratio']:.2f}x",
                (index, max(result["ours_tok_s"], result["hf_tok_s"]) * 1.12),
                ha="center",
                fontsize=9,
                weight="bold",
            )
    labels = [f"{r['preset']}\n{r.get('dtype', '')} on {_device(r)}" for r in results]
    ax.set_xticks(range(len(results)), labels, fontsize=8)
    ax.set_ylabel("output tokens / s")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.2)
    ax.legend(["Switchyard", "transformers.generate"], frameon=False, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title("Offline throughput (bench/throughput.py)", fontsize=10)
    figure.tight_layout()
    return figure


def hop_figure(reports: list[dict[str, Any]], labels: list[str]) -> Figure:
    """``bench/gateway_hop.py``: time to the first text per path, one group per report."""
    paths = [
        ("gateway", "gateway, raw client", OURS),
        ("gateway_httpx", "gateway, httpx client", "#6fa8bd"),
        ("direct", "engine double direct (gRPC)", REFERENCE),
    ]
    figure, ax = plt.subplots(figsize=(max(5.0, 2.6 * len(reports)), 3.6))
    for index, report in enumerate(reports):
        for offset, (key, _, color) in enumerate(paths):
            bar = ax.bar(
                index + (offset - 1) * 0.27, report["paths"][key]["first_ms_p50"], 0.27, color=color
            )
            ax.bar_label(bar, fmt="%.2f", fontsize=7)
    ax.set_xticks(
        range(len(reports)),
        [
            f"{label}\nhop {report['gateway_hop_ms_p50']:.2f} ms"
            for label, report in zip(labels, reports)
        ],
        fontsize=8,
    )
    ax.set_ylabel("first text, p50 (ms)")
    ax.legend([name for _, name, _ in paths], frameon=False, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title("The gateway's own hop (bench/gateway_hop.py)", fontsize=10)
    figure.tight_layout()
    return figure


def structured_figure(results: dict[str, Any]) -> Figure:
    """``bench/structured.py``: constrained against free decoding, and jump-forward on/off."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    pairs = [
        ("json_schema\njump-forward on", "constrained_tok_s", "free_tok_s"),
        (
            "json_schema\njump-forward off",
            "constrained_no_jump_forward_tok_s",
            "free_twin_of_no_jump_forward_tok_s",
        ),
    ]
    for index, (_, ours, reference) in enumerate(pairs):
        for offset, (key, color) in enumerate(((ours, OURS), (reference, REFERENCE))):
            bar = left.bar(index + (offset - 0.5) * 0.38, results[key], 0.38, color=color)
            left.bar_label(bar, fmt="%.0f", fontsize=7)
    left.set_xticks(range(len(pairs)), [label for label, _, _ in pairs], fontsize=8)
    left.set_ylabel("output tokens / s")
    left.legend(["constrained", "unconstrained, same lengths"], frameon=False, fontsize=8)
    left.set_title(f"constrained / free: {results['constrained_over_free_tok_s']:.2f}x", fontsize=9)
    steps = [results["jump_forward_steps_on"], results["jump_forward_steps_off"]]
    bars = right.bar([0, 1], steps, 0.5, color=[OURS, REFERENCE])
    right.bar_label(bars, fontsize=7)
    right.set_xticks([0, 1], ["jump-forward on", "jump-forward off"], fontsize=8)
    right.set_ylabel("engine steps (schema-heavy output)")
    right.set_title(f"jump-forward speedup: {results['jump_forward_speedup']:.2f}x", fontsize=9)
    for ax in (left, right):
        ax.spines[["top", "right"]].set_visible(False)
    figure.suptitle(
        f"Structured output (bench/structured.py), {results['device']}, "
        f"{results['requests']} requests",
        fontsize=10,
    )
    figure.tight_layout()
    return figure


def prefix_figure(result: dict[str, Any]) -> Figure:
    """``bench/prefix.py``: how many times faster the first token comes when a prefix is
    reused (per regime and tier), and the KV hit rate of prefix-aware against round-robin
    routing."""
    ratios = {
        key.removeprefix("ttft_ratio_"): value
        for key, value in result.items()
        if key.startswith("ttft_ratio") and isinstance(value, int | float)
    }
    with_routing = "hit_rate_prefix_aware" in result
    figure, axes = plt.subplots(
        1, 2 if with_routing else 1, figsize=(11 if with_routing else 7, 3.8)
    )
    left = axes[0] if with_routing else axes
    bars = left.bar(range(len(ratios)), list(ratios.values()), 0.6, color=OURS)
    left.bar_label(bars, fmt="%.2fx", fontsize=7)
    left.axhline(1.0, color=REFERENCE, linewidth=1)
    left.set_xticks(
        range(len(ratios)), [name.replace("_", " ") for name in ratios], fontsize=7, rotation=15
    )
    left.set_ylabel("TTFT without reuse / with reuse")
    left.spines[["top", "right"]].set_visible(False)
    if with_routing:
        right = axes[1]
        rates = [result["hit_rate_prefix_aware"], result["hit_rate_round_robin"]]
        bars = right.bar([0, 1], rates, 0.5, color=[OURS, REFERENCE])
        right.bar_label(bars, fmt="%.2f", fontsize=7)
        right.set_xticks([0, 1], ["prefix-aware routing", "round robin"], fontsize=8)
        right.set_ylabel("prompt tokens found in a KV cache")
        right.spines[["top", "right"]].set_visible(False)
    figure.suptitle(
        f"Prefix reuse (bench/prefix.py), {result.get('preset')} on "
        f"{result.get('gpu') or result.get('device')}",
        fontsize=10,
    )
    figure.tight_layout()
    return figure


def _device(result: dict[str, Any]) -> str:
    machine = result.get("machine") or {}
    return str(machine.get("gpu") or machine.get("device", ""))


def save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["serving", "throughput", "hop", "structured", "prefix"])
    parser.add_argument("results", type=Path, nargs="+", help="JSON written by the benchmark")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--machine", default="", help="the machine, for the figure's title")
    parser.add_argument("--labels", default="", help="hop: comma-separated label per result")
    args = parser.parse_args(argv)
    loaded = [json.loads(path.read_text()) for path in args.results]
    if args.kind == "serving":
        figure = serving_figure(loaded[0], args.machine)
    elif args.kind == "prefix":
        figure = prefix_figure(loaded[0])
    elif args.kind == "structured":
        figure = structured_figure(loaded[0])
    elif args.kind == "hop":
        labels = args.labels.split(",") if args.labels else [p.stem for p in args.results]
        figure = hop_figure(loaded, labels)
    else:
        figure = throughput_figure(loaded)
    save(figure, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
