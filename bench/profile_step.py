"""Profile engine steps of one shape: where a step's time goes, by operator and kernel.

Runs a random-weight preset, warms the engine on the same shape, then profiles a few steps
with ``torch.profiler`` and prints the top operators by device and by host time, plus the
wall time per step. For looking into a figure of ``bench/throughput.py``, e.g. a large
prefill step that runs without a CUDA graph:

    python bench/profile_step.py --device cuda --preset llama-3.2-1b --prompts 2 --prompt-len 1024
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import PRESETS, make_checkpoint, sync

from engine_service.engine import EngineConfig, LLMEngine, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--prompts", type=int, default=2, help="requests prefilled in one step")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument(
        "--cold-lengths",
        type=int,
        nargs="*",
        default=[],
        help="before the timed rounds, one round at each of these prompt lengths (first-use costs)",
    )
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.device == "cpu":
        torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        make_checkpoint(path, args.preset, dtype, args.device)
        engine = LLMEngine(
            EngineConfig(
                model=str(path),
                dtype=args.dtype,
                device=args.device,
                max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=False,
            )
        )
        vocab = PRESETS[args.preset]["vocab_size"]
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

        def one_round(tag: str) -> float:
            for i in range(args.prompts):
                prompt = [(7 * i + 13 * j) % (vocab - 3) + 3 for j in range(args.prompt_len)]
                engine.add_request(f"{tag}-{i}", prompt, params)
            sync(args.device)
            start = time.perf_counter()
            while engine.has_unfinished():
                engine.step()
            sync(args.device)
            return time.perf_counter() - start

        for length in args.cold_lengths:
            saved, args.prompt_len = args.prompt_len, length
            print(
                f"first round at prompt length {length}: {one_round(f'cold{length}') * 1e3:.1f} ms"
            )
            args.prompt_len = saved
        warm = [one_round(f"warm{r}") for r in range(2)]
        print(
            f"first rounds (compiles, allocator growth): {', '.join(f'{w * 1e3:.1f} ms' for w in warm)}"
        )
        walls = [one_round(f"timed{r}") for r in range(args.rounds)]
        activities = [torch.profiler.ProfilerActivity.CPU]
        if args.device.startswith("cuda"):
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            one_round("profiled")
        stats = engine.stats()
        print(
            f"{args.preset} {args.dtype} on {args.device}: {args.prompts} x {args.prompt_len} "
            f"prompt tokens, budget {args.max_num_batched_tokens}; wall per round "
            f"{', '.join(f'{w * 1e3:.1f} ms' for w in walls)} ({stats.steps_total} steps in all)"
        )
        sort = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.top))
        if args.device.startswith("cuda"):
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        engine.close()


if __name__ == "__main__":
    main()
