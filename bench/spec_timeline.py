"""A speculative round's timeline without a profiler: where the GPU waits on the host.

At the entry and exit of each phase of the engine's step (schedule, propose and its parts,
prepare, execute, sample, verify, the read-back, update) the host clock and a CUDA event are
taken; per marker, the mean over the rounds of the host time and of the GPU's time since the
step began. Where the GPU column equals the host column, the GPU had caught up with the host
and waited for it; where it is larger, the host ran ahead. A profiler's tracing slows graph
replays enough to hide these gaps, hence events. Checkpoints from ``bench/train_spec.py``
(acceptance changes how many rounds run, not what one costs).

    python bench/spec_timeline.py --trained DIR [--batch 1] [--methods off,eagle_tree]
                                  [--tree-topk 2 --tree-nodes 16 --tree-depth 8 ...]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_spec import Patches, add_run_arguments, batch_prompts, make_engine, method_specs

from engine_service.engine import LLMEngine, SamplingParams


class Timeline:
    """Markers per step; install with :meth:`wrap`."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.steps: list[list[tuple[str, float, torch.cuda.Event | None]]] = []
        self.patches = Patches()

    def mark(self, name: str) -> None:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.steps[-1].append((name, time.perf_counter(), event))

    def wrap(self, owner, attribute: str, name: str, step: bool = False) -> None:
        def make(original):
            def marked(*args, **kwargs):
                if step:
                    self.steps.append([])
                self.mark(name + "<")
                try:
                    return original(*args, **kwargs)
                finally:
                    self.mark(name + ">")

            return marked

        self.patches.replace(owner, attribute, make)

    def summary(self) -> list[tuple[str, float, float]]:
        """(marker, mean host ms, mean GPU ms) in step order, over the steps that ran a
        batch (the first two and the last left out), markers most of them have."""
        steps = [s for s in self.steps if len(s) > 8][2:-1]
        totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
        order: dict[str, int] = {}
        for step in steps:
            host0, event0 = step[0][1], step[0][2]
            seen: collections.Counter[str] = collections.Counter()
            for k, (name, host, event) in enumerate(step):
                seen[name] += 1
                key = f"{name}#{seen[name]}"
                order.setdefault(key, k)
                entry = totals[key]
                entry[0] += 1
                entry[1] += (host - host0) * 1000
                if event is not None:
                    entry[2] += event0.elapsed_time(event)
        return [
            (key, totals[key][1] / totals[key][0], totals[key][2] / totals[key][0])
            for key in sorted(totals, key=order.__getitem__)
            if totals[key][0] >= 0.8 * len(steps)
        ]


def install(engine: LLMEngine, timeline: Timeline) -> None:
    import engine_service.engine.engine as engine_module
    from engine_service.engine import sampler
    from engine_service.engine.spec import graphs

    timeline.wrap(engine, "step", "step", step=True)
    phases = {
        "schedule": (engine.scheduler, "schedule"),
        "propose": (engine.proposer, "propose"),
        "prepare": (engine.runner, "prepare"),
        "execute": (engine.runner, "execute"),
        "sample": (engine, "_sample"),
        "resolve": (engine, "_resolve"),
        "update": (engine.scheduler, "update"),
    }
    for name, (owner, attribute) in phases.items():
        if owner is not None:
            timeline.wrap(owner, attribute, name)
    timeline.wrap(engine_module, "verify", "verify")
    timeline.wrap(sampler.SamplerResult, "to_host", "to_host")
    proposer = engine.proposer
    if proposer is not None:
        for attribute in ("_catch_up", "_trees", "_trees_with_catch_up"):
            if hasattr(proposer, attribute):
                timeline.wrap(proposer, attribute, attribute.strip("_"))
        runner = getattr(proposer, "runner", None)
        if runner is not None:
            timeline.wrap(runner, "prepare", "proposer_prepare")
        for attribute in ("_stage", "_launch", "grow_on_device"):
            timeline.wrap(graphs.TreeGraphs, attribute, "tree." + attribute.lstrip("_"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, "cuda", "bfloat16")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--methods", default="off,eagle_tree")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    specs = method_specs(args)
    prompts = batch_prompts(args)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    for name in args.methods.split(","):
        engine = make_engine(args, specs[name])
        engine.generate(prompts, params)  # warm-up, graphs
        if cuda:
            torch.cuda.synchronize()
        steps, start = engine.steps_total, time.perf_counter()
        engine.generate(prompts, params)
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1000 / (engine.steps_total - steps)
        timeline = Timeline(cuda)
        install(engine, timeline)
        engine.generate(prompts, params)
        if cuda:
            torch.cuda.synchronize()
        timeline.patches.restore()
        print(f"== {name}, batch {args.batch}: {wall_ms:.3f} ms a step without the markers")
        print(f"   {'marker':26s} {'host ms':>8s} {'GPU ms':>8s}")
        for key, host_ms, gpu_ms in timeline.summary():
            print(f"   {key:26s} {host_ms:8.3f} {gpu_ms if cuda else float('nan'):8.3f}")
        del engine
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
