"""What LoRA adds to a layer's projections, on the GPU, inside CUDA graphs.

For one decoder layer of the 8B shape (stacked qkv, o, stacked gate/up, down), times the
base projections alone and the same projections with a LoRA delta on each (8 adapter slots,
rank 16, every token of the step under an adapter, slots mixed), at decode and prefill
step sizes. Each variant is captured once in a CUDA graph of ``--repeat`` layer passes and
replayed, so the figures are the GPU's time, not Python's launch cost (the grouping of a
step's tokens by adapter, done once per step for all layers, is timed apart): the ratio
``base / with_lora`` per step size bounds what ``bench/lora.py``'s engine throughput ratio
can reach. Prints a table and, with ``--json``, writes ``layer_ms`` per step size and
variant with ``lora_layer_over_base`` (base time over LoRA time; 1.0 means free).

    python bench/lora_kernels.py --json bench/results/lora-kernels-h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_service.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from engine_service.layers.lora import LoRASlots, lora_backend


def layer(hidden: int, heads: int, kv_heads: int, inter: int, head_dim: int):
    return {
        "qkv": QKVParallelLinear(hidden, head_dim, heads, kv_heads),
        "o": RowParallelLinear(heads * head_dim, hidden),
        "gate_up": MergedColumnParallelLinear(hidden, [inter, inter]),
        "down": RowParallelLinear(inter, hidden),
    }


def time_graph(fn, repeat: int, replays: int = 20) -> float:
    """Milliseconds per call of ``fn``, captured ``repeat`` times in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays / repeat


SWEEP = {  # triton_lora's module settings, one at a time against the defaults
    "_BLOCK_K": (32, 128),
    "_BLOCK_N": (32, 128),
    "_TARGET_PROGRAMS": (64, 256),
    "_MAX_SPLITS": (4, 32),
}


def sweep(measure) -> dict[str, float]:
    """LoRA ms per layer with each setting of :data:`SWEEP` in turn (the others default)."""
    from engine_service.layers import triton_lora

    results = {}
    for name, values in SWEEP.items():
        default = getattr(triton_lora, name)
        for value in values:
            setattr(triton_lora, name, value)
            try:
                results[f"{name}={value}"] = measure()
            finally:
                setattr(triton_lora, name, default)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256, 2048])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=8, help="layer passes per graph")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="also time the deltas under other tile and split settings of triton_lora",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    projections = {
        k: v.to(device=device, dtype=dtype) for k, v in layer(4096, 32, 8, 14336, 128).items()
    }
    for proj in projections.values():
        torch.nn.init.normal_(proj.weight, std=0.02)
    slots = LoRASlots()
    deltas = {}
    for name, proj in projections.items():
        delta = lora_backend(device)(proj, slots, args.adapters, args.rank)
        delta.lora_a_all.normal_(std=0.02)
        for b in delta.lora_b:
            b.normal_(std=0.02)
        deltas[name] = delta
    rows = []
    for num_tokens in args.tokens:
        x = {
            "hidden": torch.randn(num_tokens, 4096, device=device, dtype=dtype),
            "o": torch.randn(num_tokens, 4096, device=device, dtype=dtype),
            "down": torch.randn(num_tokens, 14336, device=device, dtype=dtype),
        }
        inputs = {"qkv": x["hidden"], "o": x["o"], "gate_up": x["hidden"], "down": x["down"]}
        token_slots = torch.arange(num_tokens, device=device) % args.adapters
        if num_tokens > 256:  # prefill: long runs of one adapter each
            token_slots = torch.arange(num_tokens, device=device) * args.adapters // num_tokens

        # A step groups its tokens once for all its layers: grouped here, outside the graphs,
        # and timed on its own.
        slots.set(token_slots)
        group = time_graph(lambda t=token_slots: slots.set(t) or slots.groups(args.adapters), 1)
        slots.set(token_slots)
        slots.groups(args.adapters)

        def passes(with_lora: bool, inputs: dict = inputs) -> None:
            for name, proj in projections.items():
                proj.lora = deltas[name] if with_lora else None
                proj(inputs[name])

        base = time_graph(lambda: passes(False), args.repeat)
        lora = time_graph(lambda: passes(True), args.repeat)
        row = {"tokens": num_tokens, "base_ms": base, "lora_ms": lora,
               "group_ms_per_step": group, "lora_layer_over_base": base / lora}  # fmt: skip
        if args.sweep:
            row["sweep"] = sweep(lambda: time_graph(lambda: passes(True), args.repeat))
        rows.append(row)
        for proj in projections.values():
            proj.lora = None
    print(
        f"{'tokens':>7} {'base ms/layer':>14} {'with LoRA':>10} {'base/LoRA':>10} {'group ms':>9}"
    )
    for row in rows:
        print(
            f"{row['tokens']:>7} {row['base_ms']:>14.4f} {row['lora_ms']:>10.4f} "
            f"{row['lora_layer_over_base']:>10.3f} {row['group_ms_per_step']:>9.4f}"
        )
        for setting, ms in row.get("sweep", {}).items():
            print(f"{'':>7} {setting:>24} {ms:>10.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "layer_ms": rows,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": {"platform": platform.platform(), "torch": torch.__version__,
                        "device": torch.cuda.get_device_name()},
        }  # fmt: skip
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
