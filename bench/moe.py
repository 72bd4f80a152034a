"""Mixture-of-experts compute: our kernel against the per-expert loop, in the same run.

The reference is :class:`~engine_service.layers.moe.LoopMoEKernel`, the per-expert loop of
the reference implementations (``transformers``' eager MoE: one scan of the routing per
expert, gather, two GEMMs, weighted ``index_add``). Ours is the device's default kernel: the
fused Triton kernel on CUDA (``engine_service/layers/moe_triton.py``), the grouped torch
kernel on the CPU (one sort, one GEMM pair per expert that got tokens, one scatter-add).
Both run the same random weights and routings; outputs are compared before timing.

Shapes (``--shapes``), each at a decode-sized and a prefill-sized token count:

- ``mixtral``: Mixtral-8x7B's experts, 8 experts of 14336 x 4096, top-2;
- ``deepseek``: DeepSeek-V3's routed experts, 256 experts of 2048 x 7168, top-8.

On the CPU (``--device cpu``, one thread) both shapes are scaled down by ``--cpu-scale`` in
the hidden and inner sizes (and DeepSeek's 256 experts to 64, top-6), so that the weights fit
a small machine and the run ends in a minute or two; the table prints the shapes used.

Keys: ``fused_over_loop`` (geometric mean over every shape and token count of loop time over
ours), ``<shape>_fused_over_loop`` (the same over one shape's token counts) and
``<shape>_<tokens>_fused_over_loop``. With two GPUs visible (or ``--expert-parallel``, gloo
on the CPU) it also writes ``overlap_speedup`` and ``ep_over_tp_tok_s`` from
``bench/moe_parallel.py`` (see :func:`expert_parallel_results`).

    python bench/moe.py --json bench/results/moe-cpu.json
    python bench/moe.py --device cuda --json bench/results/moe-h200.json        # 2 GPUs: EP keys too
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import sync

from engine_service.layers.moe import LoopMoEKernel, default_moe_kernel, select_experts


@dataclass(frozen=True)
class MoEShape:
    hidden: int
    inner: int
    num_experts: int
    top_k: int


FULL_SHAPES = {
    "mixtral": MoEShape(4096, 14336, 8, 2),
    "deepseek": MoEShape(7168, 2048, 256, 8),
}
TOKENS = {"cpu": (16, 256), "cuda": (32, 4096)}


def cpu_shape(name: str, scale: int) -> MoEShape:
    full = FULL_SHAPES[name]
    if name == "deepseek":
        return MoEShape(full.hidden // scale, full.inner // scale, 64, 6)
    return MoEShape(full.hidden // scale, full.inner // scale, full.num_experts, full.top_k)


def make_inputs(shape: MoEShape, num_tokens: int, dtype: torch.dtype, device: str, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, shape.hidden, generator=gen, device=device).to(dtype)
    w13 = torch.randn(
        shape.num_experts, 2 * shape.inner, shape.hidden, generator=gen, device=device
    ).to(dtype) * (shape.hidden**-0.5)
    w2 = torch.randn(shape.num_experts, shape.hidden, shape.inner, generator=gen, device=device).to(
        dtype
    ) * (shape.inner**-0.5)
    logits = torch.randn(num_tokens, shape.num_experts, generator=gen, device=device)
    weights, ids = select_experts(logits, shape.top_k, renormalize=True)
    return x, w13, w2, weights, ids


def time_kernel(kernel, inputs, device: str, repeats: int) -> float:
    """Median seconds of one call (after a warm-up call)."""
    kernel.forward(*inputs, "silu")
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        kernel.forward(*inputs, "silu")
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Tile shapes tried by --sweep-tiles: (block_m, block_n, block_k, num_warps, num_stages).
SWEEP_TILES = [
    (16, 64, 128, 4, 4),
    (32, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 128, 64, 8, 3),
    (64, 128, 128, 8, 3),
    (64, 256, 64, 8, 3),
    (128, 64, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
]


def sweep_tiles(inputs, loop_s: float, repeats: int) -> dict[str, float]:
    """Loop time over the fused kernel's under each of SWEEP_TILES (one case)."""
    from engine_service.layers.moe_triton import MoETiles, fused_moe

    class Fixed:
        def __init__(self, tiles):
            self.tiles = tiles

        def forward(self, x, w13, w2, weights, ids, act):
            return fused_moe(x, w13, w2, weights, ids, act, tiles=self.tiles)

    ratios = {}
    for bm, bn, bk, warps, stages in SWEEP_TILES:
        key = f"{bm}x{bn}x{bk}w{warps}s{stages}"
        try:
            seconds = time_kernel(
                Fixed(MoETiles(bm, bn, bk, warps, stages)), inputs, "cuda", repeats
            )
        except Exception as exc:  # a shape the compiler refuses (shared memory): skip it
            print(f"    tiles {key}: {type(exc).__name__}")
            continue
        ratios[key] = round(loop_s / seconds, 3)
        print(f"    tiles {key:18} {seconds * 1e3:8.2f} ms {loop_s / seconds:6.2f}x", flush=True)
    return ratios


def expert_parallel_results(args: argparse.Namespace) -> dict[str, float]:
    """Issue 12's expert-parallel keys: EP=2 with micro-batch overlap over EP=2 without
    (``overlap_speedup``) and over TP=2 (``ep_over_tp_tok_s``), measured by
    ``bench/moe_parallel.py`` in two processes (NCCL on two GPUs, gloo on the CPU). Runs when
    ``--expert-parallel`` is given, or on CUDA when two devices are visible."""
    two_gpus = args.device == "cuda" and torch.cuda.device_count() >= 2
    if not (args.expert_parallel or two_gpus):
        return {}
    if args.device == "cuda" and not two_gpus:
        print("expert-parallel keys: two CUDA devices are needed, skipped")
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ep.json"
        script = Path(__file__).with_name("moe_parallel.py")
        subprocess.run(
            [sys.executable, str(script), "--device", args.device, "--json", str(out)], check=True
        )
        measured = json.loads(out.read_text())
    return {
        "overlap_speedup": round(measured["overlap_speedup"], 3),
        "ep_over_tp_tok_s": round(measured["ep_over_tp_tok_s"], 3),
        "expert_parallel": measured,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--shapes", nargs="+", default=list(FULL_SHAPES), choices=list(FULL_SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=None)
    parser.add_argument("--cpu-scale", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--expert-parallel",
        action="store_true",
        help="also measure EP=2 with and without overlap and TP=2 (bench/moe_parallel.py)",
    )
    parser.add_argument(
        "--sweep-tiles",
        action="store_true",
        help="CUDA: also time the fused kernel under each candidate tile shape (SWEEP_TILES)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    repeats = args.repeats or (20 if device == "cuda" else 3)
    ours, loop = default_moe_kernel(device), LoopMoEKernel()

    results: dict[str, object] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": args.threads,
        "ours": ours.name,
        "reference": loop.name,
        "shapes": {},
    }
    print(
        f"{'shape':28} {'tokens':>7} {'loop ms':>10} {f'{ours.name} ms':>10} {'speedup':>8} {'max diff':>9}"
    )
    all_ratios = []
    for name in args.shapes:
        shape = FULL_SHAPES[name] if device == "cuda" else cpu_shape(name, args.cpu_scale)
        results["shapes"][name] = vars(shape)
        ratios = []
        for num_tokens in args.tokens or TOKENS[device]:
            inputs = make_inputs(shape, num_tokens, dtype, device, seed=num_tokens)
            want = loop.forward(*inputs, "silu").float()
            got = ours.forward(*inputs, "silu").float()
            diff = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
            loop_s = time_kernel(loop, inputs, device, repeats)
            ours_s = time_kernel(ours, inputs, device, repeats)
            ratio = loop_s / ours_s
            ratios.append(ratio)
            results[f"{name}_{num_tokens}_fused_over_loop"] = round(ratio, 3)
            results[f"{name}_{num_tokens}_loop_ms"] = round(loop_s * 1e3, 3)
            results[f"{name}_{num_tokens}_ours_ms"] = round(ours_s * 1e3, 3)
            label = f"{name} {shape.num_experts}x{shape.inner}x{shape.hidden} k{shape.top_k}"
            print(
                f"{label:28} {num_tokens:>7} {loop_s * 1e3:>10.2f} {ours_s * 1e3:>10.2f} "
                f"{ratio:>7.2f}x {diff:>9.1e}",
                flush=True,
            )
            if args.sweep_tiles and device == "cuda":
                results.setdefault("tiles_sweep", {})[f"{name}_{num_tokens}"] = sweep_tiles(
                    inputs, loop_s, repeats
                )
            del inputs
        results[f"{name}_fused_over_loop"] = round(math.prod(ratios) ** (1 / len(ratios)), 3)
        all_ratios += ratios
    results["fused_over_loop"] = round(math.prod(all_ratios) ** (1 / len(all_ratios)), 3)
    results.update(expert_parallel_results(args))
    print(f"fused_over_loop (geometric mean): {results['fused_over_loop']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
