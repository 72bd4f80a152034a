"""Offline throughput: our engine against ``transformers.generate`` on the same workload.

A fixed synthetic workload (by default 128 requests, prompt lengths 16-1024, output lengths
16-512, from a fixed seed, ignore_eos) on a random-weight Llama-shaped checkpoint. Ours gets
every request at once and batches continuously (at most ``--batch-size`` sequences at a
time); the reference runs static batches of the same size, left-padded, each batch running
to its longest output. Both are credited only with each request's own output tokens.

    python bench/throughput.py                      # CPU, tiny preset, a few minutes
    python bench/throughput.py --device cuda --preset llama-3.2-1b --json out.json

On CUDA it also measures batch-1 decode speed beside the HBM roofline: weight bytes over the
measured device copy bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import PRESETS, make_checkpoint, sync

from engine_service.engine import EngineConfig, LLMEngine, SamplingParams


def workload(n: int, vocab: int, prompt_range, output_range, seed: int = 0):
    rng = random.Random(seed)
    requests = []
    for _ in range(n):
        prompt_len = rng.randint(*prompt_range)
        requests.append(
            ([rng.randrange(3, vocab) for _ in range(prompt_len)], rng.randint(*output_range))
        )
    return requests


def run_ours(args, path: Path, requests) -> dict:
    engine = LLMEngine(
        EngineConfig(
            model=str(path),
            dtype=args.dtype,
            device=args.device,
            max_num_seqs=args.batch_size,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=False,
        )
    )
    # Count the steps that replay a CUDA graph; the rest run eagerly.
    replays = [0]
    graphs = getattr(engine.runner, "graphs", None)
    if graphs is not None:
        fits = graphs.fits

        def counting_fits(inputs):
            ok = fits(inputs)
            replays[0] += bool(ok)
            return ok

        graphs.fits = counting_fits
    # Warm up kernels and allocator on a short request.
    list(
        engine.stream("warmup", requests[0][0][:16], SamplingParams(max_tokens=4, ignore_eos=True))
    )
    sync(args.device)
    replays[0] = 0
    start = time.perf_counter()
    for i, (prompt, out_len) in enumerate(requests):
        engine.add_request(
            str(i), prompt, SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
        )
    produced = 0
    while engine.has_unfinished():
        for out in engine.step():
            produced += len(out.new_token_ids)
    sync(args.device)
    elapsed = time.perf_counter() - start
    stats = engine.stats()
    counted = graphs is not None
    if graphs is not None:
        del graphs.fits  # the counting wrapper holds the graphs (and their pool) alive
    engine.close()
    del engine, graphs
    gc.collect()  # the engine's graphs and buffers go before the reference loads its model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "seconds": elapsed,
        "output_tokens": produced,
        "tok_s": produced / elapsed,
        "steps": stats.steps_total,
        "preemptions": stats.num_preemptions,
        "graph_replays": replays[0] if counted else None,
    }


def run_hf(args, path: Path, requests) -> dict:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype if args.dtype != "auto" else "float32"
    ]
    model = (
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    )
    useful = 0
    sync(args.device)
    start = time.perf_counter()
    for b in range(0, len(requests), args.batch_size):
        batch = requests[b : b + args.batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (prompt, _) in enumerate(batch):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        longest = max(n for _, n in batch)
        with torch.inference_mode():
            model.generate(
                ids.to(args.device),
                attention_mask=mask.to(args.device),
                max_new_tokens=longest,
                min_new_tokens=longest,
                do_sample=False,
                pad_token_id=0,
            )
        useful += sum(n for _, n in batch)
    sync(args.device)
    elapsed = time.perf_counter() - start
    del model
    return {"seconds": elapsed, "output_tokens": useful, "tok_s": useful / elapsed}


def decode_roofline(args, path: Path) -> dict:
    """Batch-1 decode tokens/s beside weight bytes over measured copy bandwidth."""
    engine = LLMEngine(
        EngineConfig(
            model=str(path), dtype=args.dtype, device=args.device, kv_cache_memory_bytes=2 << 30
        )
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    buf = torch.empty(1 << 30, dtype=torch.uint8, device=args.device)
    dst = torch.empty_like(buf)
    for _ in range(3):
        dst.copy_(buf)
    sync(args.device)
    start = time.perf_counter()
    reps = 20
    for _ in range(reps):
        dst.copy_(buf)
    sync(args.device)
    bandwidth = 2 * buf.numel() * reps / (time.perf_counter() - start)
    del buf, dst
    params = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)
    list(engine.stream("warm", [5] * 32, SamplingParams(max_tokens=8, ignore_eos=True)))
    sync(args.device)
    start = time.perf_counter()
    first = None
    count = 0
    for out in engine.stream("one", [7] * 128, params):
        count += len(out.new_token_ids)
        if first is None:
            sync(args.device)
            first = time.perf_counter()
    sync(args.device)
    decode_s = time.perf_counter() - first
    tok_s = (count - 1) / decode_s
    roofline = bandwidth / weight_bytes
    return {
        "batch1_decode_tok_s": tok_s,
        "roofline_tok_s": roofline,
        "fraction_of_roofline": tok_s / roofline,
        "weight_bytes": weight_bytes,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--model", help="use this checkpoint instead of a random preset")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 1024))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 512))
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="our max concurrent sequences and the reference's static batch",
    )
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--roofline", action="store_true", help="also batch-1 decode (CUDA)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="draw the result into this PNG")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    torch.set_num_threads(torch.get_num_threads())

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            path = Path(args.model)
        else:
            path = Path(tmp) / args.preset
            dtype = {
                "float32": torch.float32,
                "bfloat16": torch.bfloat16,
                "float16": torch.float16,
            }[args.dtype]
            make_checkpoint(path, args.preset, dtype, args.device)
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        requests = workload(args.num_requests, vocab, args.prompt_len, args.output_len)

        ours = run_ours(args, path, requests)
        hf = None if args.skip_reference else run_hf(args, path, requests)
        roofline = decode_roofline(args, path) if args.roofline else None

    result = {
        "machine": {
            "device": args.device,
            "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        },
        "preset": args.model or args.preset,
        "dtype": args.dtype,
        "num_requests": args.num_requests,
        "batch_size": args.batch_size,
        "prompt_len": list(args.prompt_len),
        "output_len": list(args.output_len),
        "ours_tok_s": ours["tok_s"],
        "ours_seconds": ours["seconds"],
        "ours_steps": ours["steps"],
        "ours_preemptions": ours["preemptions"],
        "ours_graph_replays": ours["graph_replays"],
        "hf_tok_s": hf["tok_s"] if hf else None,
        "hf_seconds": hf["seconds"] if hf else None,
        "ratio": ours["tok_s"] / hf["tok_s"] if hf else None,
    }
    if roofline:
        result.update(roofline)

    rows = [
        ("engine", "output tok/s", "seconds"),
        ("switchyard", f"{ours['tok_s']:.1f}", f"{ours['seconds']:.1f}"),
    ]
    if hf:
        rows.append(("transformers.generate", f"{hf['tok_s']:.1f}", f"{hf['seconds']:.1f}"))
    print(f"\n{result['preset']} {args.dtype} on {args.device}, {args.num_requests} requests")
    for row in rows:
        print(f"  {row[0]:<24}{row[1]:>14}{row[2]:>10}")
    if ours["graph_replays"] is not None:
        print(f"  steps: {ours['steps']}, of which CUDA graph replays: {ours['graph_replays']}")
    if hf:
        print(f"  ratio (ours / transformers): {result['ratio']:.2f}x")
    if roofline:
        print(
            f"  batch-1 decode: {roofline['batch1_decode_tok_s']:.1f} tok/s; roofline "
            f"{roofline['roofline_tok_s']:.1f} tok/s ({roofline['fraction_of_roofline']:.0%})"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        from plots import save, throughput_figure

        save(throughput_figure([result]), args.plot)


if __name__ == "__main__":
    main()
