"""Where a speculative round's time goes: cProfile of batch-1 decoding, each method.

Builds the `bench/train_spec.py` checkpoints (``--steps`` few: acceptance does not matter
here, only the cost of a round), then decodes one prompt with speculation off and with each
method under cProfile, and prints per method the wall time per generated token and per
verification round (engine step), and the functions with the most own time (host syncs show
up as the time of the call that waits, e.g. ``tolist`` or ``item``).

Before the profiled run, a timed run (no profiler) splits each round's wall time into the
model's forward passes (target and proposer, timed around the models' ``forward`` and
``compute_logits`` and the graphs' replays, or their CPU twins' eager runs) and the host work
of each phase of the engine's step, exclusive of the model and of nested phases: schedule,
propose, place (drafts into the batch, grammar masks), prepare (the target step's inputs),
execute, sample, verify, resolve (the read-back), update (the scheduler's commit). On a CPU
the model's time is the CPU's; the phases' host time is what a GPU round pays too.
``--twin-graphs`` runs the CPU twins of the CUDA graphs (the host path a GPU engine takes).

    python bench/profile_spec.py --trained DIR --device cuda --dtype bfloat16 --out DIR
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import sync

from engine_service.engine import EngineConfig, LLMEngine, SamplingParams


def add_run_arguments(parser: argparse.ArgumentParser, device: str, dtype: str) -> None:
    """The flags a profile of speculative rounds shares (``bench/spec_timeline.py`` too):
    the trained checkpoints, device, methods, batch and the tree's shape."""
    parser.add_argument("--trained", type=Path, required=True)
    parser.add_argument("--device", default=device)
    parser.add_argument("--dtype", default=dtype)
    parser.add_argument("--batch", type=int, default=1, help="copies of the prompt at once")
    # The tree bench/spec_gpu.sh measures by default.
    parser.add_argument("--tree-topk", type=int, default=2)
    parser.add_argument("--tree-nodes", type=int, default=16)
    parser.add_argument("--tree-depth", type=int, default=8)
    parser.add_argument(
        "--tree-batch-tokens",
        type=int,
        default=128,
        help="the tree's max_num_batched_draft_tokens (0: trees never shrink)",
    )


def method_specs(args: argparse.Namespace) -> dict[str, dict | None]:
    """Each method's speculative config over ``args.trained``'s checkpoints."""
    folder = args.trained
    tree = {"topk": args.tree_topk, "num_draft_tokens": args.tree_nodes}
    if args.tree_batch_tokens:
        tree["max_num_batched_draft_tokens"] = args.tree_batch_tokens
    return {
        "off": None,
        "ngram": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4},
        "draft": {"model": str(folder / "draft"), "num_speculative_tokens": 4},
        "eagle": {"method": "eagle", "model": str(folder / "eagle"), "num_speculative_tokens": 4},
        "eagle_tree": {
            "method": "eagle",
            "model": str(folder / "eagle"),
            "num_speculative_tokens": args.tree_depth,
            "tree": tree,
        },
    }


def batch_prompts(args: argparse.Namespace) -> list[list[int]]:
    """``args.batch`` copies of the first training prompt's first 200 bytes."""
    text = json.loads((args.trained / "prompts.json").read_text())[0][:200]
    return [[b + 3 for b in text.encode()]] * args.batch


def make_engine(args: argparse.Namespace, spec: dict | None) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=str(args.trained / "target"),
            dtype=args.dtype,
            device=args.device,
            max_num_seqs=max(4, args.batch),
            kv_cache_memory_bytes=1 << 30,
            speculative_config=json.dumps(spec) if spec else None,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, "cpu", "float32")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--methods", default="off,ngram,draft,eagle,eagle_tree")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (least per phase)")
    parser.add_argument("--twin-graphs", action="store_true", help="CPU twins of the graphs")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    specs = method_specs(args)
    prompts = batch_prompts(args)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    reference = None
    for name in args.methods.split(","):
        spec = specs[name]
        engine = make_engine(args, spec)
        if args.twin_graphs and spec is not None:
            with_twin_graphs(engine)
        engine.generate(prompts, params)  # warm-up, graphs
        runs = []
        for _ in range(args.repeat):
            steps = engine.steps_total
            timer = PhaseTimer(engine, args.device)
            with timer:
                engine.generate(prompts, params)
            runs.append(timer.per_round(engine.steps_total - steps))
        # Each phase's least time over the runs: a shared machine only ever adds time.
        phases = {key: min(run[key] for run in runs) for key in runs[0]}
        sync(args.device)
        steps = engine.steps_total
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        out = engine.generate(prompts, params)
        sync(args.device)
        profiler.disable()
        wall = time.perf_counter() - start
        rounds = engine.steps_total - steps  # one verification round a step (and the prefill)
        stream = io.StringIO()
        stats = pstats.Stats(profiler, stream=stream)
        stats.sort_stats("tottime").print_stats(35)
        stats.sort_stats("cumulative").print_stats(45)
        (args.out / f"profile-{name}.txt").write_text(stream.getvalue())
        summary[name] = {
            "wall_s": wall,
            "ms_per_token": 1000 * wall / args.max_tokens,
            "rounds": rounds,
            "ms_per_round": 1000 * wall / rounds,
            "graph_replays": graph_replays(engine),
            "timed_ms_per_round": phases,
        }
        if name == "off":
            reference = out
        elif reference is not None:
            summary[name]["equal_to_off"] = out == reference
        print(name, json.dumps(summary[name]))
        del engine
        torch.cuda.empty_cache() if args.device.startswith("cuda") else None
    (args.out / "profile-spec.json").write_text(json.dumps(summary, indent=2, default=str))


_PHASES = {
    "schedule": ("scheduler", "schedule"),
    "propose": ("proposer", "propose"),
    "prepare": ("runner", "prepare"),
    "execute": ("runner", "execute"),
    "sample": (None, "_sample"),
    "resolve": (None, "_resolve"),
    "update": ("scheduler", "update"),
}


class Patches:
    """Attributes replaced for a measurement, and put back (class attributes outlive an
    engine)."""

    def __init__(self) -> None:
        self._undo: list[tuple[object, str, object]] = []

    def replace(self, owner, attribute: str, make) -> None:
        """``owner.attribute = make(original)``."""
        original = getattr(owner, attribute)
        own = attribute in vars(owner)  # else a method of its class, found again once deleted
        setattr(owner, attribute, make(original))
        self._undo.append((owner, attribute, original if own else None))

    def restore(self) -> None:
        for owner, attribute, original in reversed(self._undo):
            if original is None:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, original)
        self._undo.clear()


class PhaseTimer:
    """Wall time per phase of the engine's steps, exclusive of nested phases and of the
    models' forward passes (which count as ``model``); install with ``with``."""

    def __init__(self, engine: LLMEngine, device: str) -> None:
        self.engine, self.device = engine, device
        self.totals: dict[str, float] = {}
        self.stack: list[list[float]] = []  # [phase start, time spent in nested phases]
        self.patches = Patches()

    def _timed(self, name: str, fn):
        def timed(*args, **kwargs):
            self.stack.append([time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                if name == "model":
                    sync(self.device)
                start, nested = self.stack.pop()
                spent = time.perf_counter() - start
                self.totals[name] = self.totals.get(name, 0.0) + spent - nested
                if self.stack:
                    self.stack[-1][1] += spent

        return timed

    def _wrap(self, owner, attribute: str, name: str) -> None:
        self.patches.replace(owner, attribute, lambda original: self._timed(name, original))

    def __enter__(self) -> PhaseTimer:
        engine = self.engine
        for name, (owner, attribute) in _PHASES.items():
            target = engine if owner is None else getattr(engine, owner)
            if target is not None:
                self._wrap(target, attribute, name)
        import engine_service.engine.batch as batch_module
        import engine_service.engine.engine as engine_module

        self._wrap(batch_module.ScheduledBatch, "place_drafts", "place")
        self._wrap(engine_module, "draft_grammar_masks", "place")
        self._wrap(engine_module, "verify", "verify")
        models = [engine.model]
        proposer = engine.proposer
        for model in (getattr(proposer, "head", None), getattr(proposer, "runner", None)):
            model = getattr(model, "model", model)
            if model is not None and all(model is not m for m in models):
                models.append(model)
        # A graph's replay is device work; its CPU twin's eager ops count as the model's too.
        from engine_service.engine.cuda_graphs import StepGraphs
        from engine_service.engine.spec.graphs import _DraftGraphs

        self._wrap(StepGraphs, "_eager", "model")
        self._wrap(_DraftGraphs, "_launch", "model")
        for model in models:  # their __call__ (forward) and compute_logits
            self._wrap(model, "forward", "model")
            self._wrap(model, "compute_logits", "model")
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.wall = time.perf_counter() - self.start
        self.patches.restore()

    def per_round(self, rounds: int) -> dict[str, float]:
        out = {name: 1000 * t / rounds for name, t in sorted(self.totals.items())}
        out["other"] = 1000 * (self.wall - sum(self.totals.values())) / rounds
        out["host"] = 1000 * self.wall / rounds - out.get("model", 0.0)
        out["wall"] = 1000 * self.wall / rounds
        return {name: round(value, 3) for name, value in out.items()}


def with_twin_graphs(engine: LLMEngine, max_tokens: int = 64) -> None:
    """The CPU twins of the graphs a CUDA engine captures (the host path it takes)."""
    from engine_service.engine.cuda_graphs import StepGraphs

    runner, seqs = engine.runner, engine.config.max_num_seqs
    runner.graphs = StepGraphs(runner, max_tokens, seqs, capture=False, mixed=True, trees=True)
    engine.proposer.capture_graphs(max_tokens, seqs, capture=False)


def graph_replays(engine: LLMEngine) -> dict[str, object]:
    """How many steps replayed CUDA graphs (all runs of the engine): the target's by kind,
    the proposer's step graphs by kind, its whole-chain and whole-tree graphs."""
    out: dict[str, object] = {}
    if engine.runner.graphs is not None:
        out["target"] = dict(engine.runner.graphs.replays)
    proposer = engine.proposer
    runner = getattr(proposer, "runner", None)
    if runner is not None and runner.graphs is not None:
        out["proposer"] = dict(runner.graphs.replays)
    chains = getattr(proposer, "chain_graphs", None)
    if chains is not None:
        out["chains"] = chains.replays
    trees = getattr(proposer, "tree_graphs_by_size", {})  # every size a step took
    if trees:
        out["trees"] = sum(graphs.replays for graphs in trees.values())
    return out


if __name__ == "__main__":
    main()
