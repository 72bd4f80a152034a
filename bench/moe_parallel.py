"""One MoE layer over two ranks: expert parallel with and without the micro-batch overlap,
against tensor parallel, on the same shape and tokens in the same run.

Two processes (``torch.distributed``: NCCL on two GPUs, gloo on the CPU) each build a
:class:`FusedMoE` three ways and time its forward pass on a batch of tokens:

- ``ep_overlap``: ``--enable-expert-parallel``, whole experts per rank, tokens dispatched and
  combined all-to-all in two micro-batches whose communication overlaps the other's experts;
- ``ep``: the same without the overlap (one batch: dispatch, experts, combine in turn);
- ``tp``: tensor parallel, every rank a half of every expert's inner dimension, all-reduced.

Every expert has the same weights in all three (seeded per expert), so their outputs are
compared too. Keys: ``overlap_speedup`` (ep_overlap over ep, tokens per second) and
``ep_over_tp_tok_s`` (ep_overlap over tp). The ``deepseek-v3`` preset is one DeepSeek-V3
MoE layer's routed experts (hidden 7168, expert inner 2048, 256 experts, top 8).

    python bench/moe_parallel.py                                   # CPU, gloo, small preset
    python bench/moe_parallel.py --device cuda --preset deepseek-v3 --json bench/results/moe_parallel-h200x2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_service.layers.moe import FusedMoE
from engine_service.layers.parallel import TensorParallel

PRESETS = {
    "small": dict(hidden=512, inner=256, experts=16, top_k=4),
    "deepseek-v3": dict(hidden=7168, inner=2048, experts=256, top_k=8),
}
RANKS = 2
MODES = ("ep_overlap", "ep", "tp")


def build(mode: str, rank: int, shape: dict, dtype, device) -> FusedMoE:
    tp = TensorParallel(rank, RANKS, expert_parallel=mode != "tp")
    with torch.device("meta"):
        moe = FusedMoE(shape["experts"], shape["top_k"], shape["hidden"], shape["inner"], tp=tp)
    moe.to_empty(device=device)
    moe.to(dtype)
    inner, hidden = shape["inner"], shape["hidden"]
    for e in range(shape["experts"]):
        if moe.ep is not None and not moe.ep.holds(e):
            continue
        generator = torch.Generator(device=device).manual_seed(e)
        gate_up = torch.randn(2, inner, hidden, generator=generator, device=device, dtype=dtype)
        down = torch.randn(hidden, inner, generator=generator, device=device, dtype=dtype)
        for which, tensor in (("gate", gate_up[0] / 20), ("up", gate_up[1] / 20)):
            moe.weight_loader(moe.w13, tensor, (e, which))
        moe.weight_loader(moe.w2, down / 20, (e, "down"))
    if moe.ep is not None:
        moe.ep.overlap = mode == "ep_overlap"
    return moe


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def rank_main(rank: int, args: argparse.Namespace, init_file: str, out: str) -> None:
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=RANKS,
    )
    shape = PRESETS[args.preset]
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator(device=device).manual_seed(123)
    x = torch.randn(args.tokens, shape["hidden"], generator=generator, device=device, dtype=dtype)
    router_logits = torch.randn(
        args.tokens, shape["experts"], generator=generator, device=device, dtype=torch.float32
    )
    results, outputs = {}, {}
    with torch.inference_mode():
        for mode in MODES:
            moe = build(mode, rank, shape, dtype, device)
            for _ in range(args.warmup):
                moe(x, router_logits)
            sync(device)
            start = time.perf_counter()
            for _ in range(args.iters):
                result = moe(x, router_logits)
            sync(device)
            seconds = (time.perf_counter() - start) / args.iters
            results[mode] = {"ms_per_layer": seconds * 1e3, "tok_s": args.tokens / seconds}
            outputs[mode] = result.float().cpu()
            del moe
            if cuda:
                torch.cuda.empty_cache()
    if rank == 0:
        reference = outputs["tp"]
        scale = reference.abs().max().item()
        for mode in ("ep_overlap", "ep"):
            results[mode]["max_rel_diff_vs_tp"] = (
                outputs[mode] - reference
            ).abs().max().item() / scale
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS))
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per forward pass")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.preset = args.preset or ("deepseek-v3" if cuda else "small")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.tokens = args.tokens or (4096 if cuda else 512)
    args.iters = args.iters or (10 if cuda else 3)
    if cuda and torch.cuda.device_count() < RANKS:
        sys.exit(f"needs {RANKS} CUDA devices, {torch.cuda.device_count()} visible")

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        mp.spawn(rank_main, args=(args, os.path.join(tmp, "init"), out), nprocs=RANKS)
        results = json.loads(Path(out).read_text())

    print(f"{'mode (2 ranks)':<28}{'ms/layer':>10}{'tok/s':>12}{'rel diff vs tp':>16}")
    for mode in MODES:
        r = results[mode]
        diff = f"{r['max_rel_diff_vs_tp']:.2e}" if "max_rel_diff_vs_tp" in r else "-"
        print(f"{mode:<28}{r['ms_per_layer']:>10.2f}{r['tok_s']:>12.0f}{diff:>16}")
    overlap = results["ep_overlap"]["tok_s"] / results["ep"]["tok_s"]
    ep_over_tp = results["ep_overlap"]["tok_s"] / results["tp"]["tok_s"]
    print(f"overlap_speedup = {overlap:.3f}")
    print(f"ep_over_tp_tok_s = {ep_over_tp:.3f}")
    result = {
        "overlap_speedup": overlap,
        "ep_over_tp_tok_s": ep_over_tp,
        "modes": results,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "shape": PRESETS[args.preset],
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "ranks": RANKS,
        },
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
