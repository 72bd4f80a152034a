"""Host overhead of an engine step: the share of step time spent outside the model's forward.

A decode batch of B sequences (B = 1 and 64 by default) runs on a tiny random Llama; every
step's wall time and the model's own forward time (the runner's execute: embedding to logits,
eager or a graph replay, timed with device events on CUDA) are measured in the same run,
after warm-up:

    host_overhead_fraction = (step time - forward time) / step time

Both engine modes run: synchronous steps (scheduling, input building, sampling and the
update all in line with the forward pass) as the reference, and overlapped scheduling (the
default), where that host work runs while the device computes.

    python bench/step_overhead.py --json bench/results/step_overhead.json
    python bench/step_overhead.py --device cuda --preset llama-3.2-1b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import PRESETS, make_checkpoint, sync

from engine_service.engine import EngineConfig, LLMEngine, SamplingParams


class ForwardTimer:
    """Wraps the runner's ``execute`` (the forward pass, eager or a graph replay, and the
    logits projection); sums its time per step, from device events on CUDA."""

    def __init__(self, runner, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.events: list[tuple] = []
        self.seconds = 0.0
        self._lock = threading.Lock()
        execute = runner.execute

        def timed_execute(*args, **kwargs):
            start = self._mark()
            out = execute(*args, **kwargs)
            self._add(start, self._mark())
            return out

        runner.execute = timed_execute

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _add(self, start, end) -> None:
        with self._lock:
            if self.cuda:
                self.events.append((start, end))
            else:
                self.seconds += end - start

    def take(self) -> float:
        """Forward seconds since the last call (waits for the device on CUDA)."""
        with self._lock:
            if self.cuda:
                torch.cuda.synchronize()
                total = sum(s.elapsed_time(e) for s, e in self.events) / 1000
                self.events = []
                return total
            total, self.seconds = self.seconds, 0.0
            return total


def measure(args, path: Path, batch: int, overlapped: bool) -> dict:
    engine = LLMEngine(
        EngineConfig(
            model=str(path),
            dtype=args.dtype,
            device=args.device,
            max_num_seqs=max(batch, 1),
            num_kv_blocks=batch * (-(-(args.prompt_len + args.steps * 2 + 64) // 16)) + 8,
            enable_prefix_caching=False,
            async_scheduling=overlapped,
            cuda_graph_max_batch=max(batch, 1),
        )
    )
    timer = ForwardTimer(engine.runner, args.device)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=args.steps * 2 + 32, ignore_eos=True)
    for i in range(batch):
        prompt = [(7 * i + j) % (vocab - 3) + 3 for j in range(args.prompt_len)]
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(args.warmup):  # prompts, then decodes until every path is warm
        engine.step()
    sync(args.device)
    timer.take()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    sync(args.device)
    elapsed = time.perf_counter() - start
    forward = timer.take()
    engine.close()
    step_ms = elapsed / args.steps * 1000
    forward_ms = forward / args.steps * 1000
    return {
        "step_ms": step_ms,
        "forward_ms": forward_ms,
        "host_overhead_fraction": max(0.0, (step_ms - forward_ms) / step_ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (on a shared 2-core machine two threads make steps swing)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]

    results: dict = {
        "machine": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / args.preset
        make_checkpoint(path, args.preset, getattr(torch, args.dtype), "cpu")
        print(f"{'batch':>5} {'mode':>11} {'step ms':>9} {'forward ms':>11} {'host share':>11}")
        for batch in batches:
            for overlapped in (False, True):
                mode = "overlapped" if overlapped else "sync"
                figures = measure(args, path, batch, overlapped)
                results["runs"][f"{mode}_bs{batch}"] = figures
                print(
                    f"{batch:>5} {mode:>11} {figures['step_ms']:>9.3f} "
                    f"{figures['forward_ms']:>11.3f} {figures['host_overhead_fraction']:>11.3f}"
                )
            ours = results["runs"][f"overlapped_bs{batch}"]["host_overhead_fraction"]
            reference = results["runs"][f"sync_bs{batch}"]["host_overhead_fraction"]
            results[f"host_overhead_fraction_bs{batch}"] = ours
            results[f"host_overhead_fraction_sync_bs{batch}"] = reference
            results[f"overlap_step_time_ratio_bs{batch}"] = (
                results["runs"][f"sync_bs{batch}"]["step_ms"]
                / results["runs"][f"overlapped_bs{batch}"]["step_ms"]
            )
    for key in sorted(k for k in results if k.startswith(("host_", "overlap_"))):
        print(f"{key}: {results[key]:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
