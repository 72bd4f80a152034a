"""Where a speculative round's time goes: cProfile of batch-1 decoding, each method.

Builds the `bench/train_spec.py` checkpoints (``--steps`` few: acceptance does not matter
here, only the cost of a round), then decodes one prompt with speculation off and with each
method under cProfile, and prints per method the wall time per generated token and per
verification round, and the functions with the most own time (host syncs show up as the
time of the call that waits, e.g. ``tolist`` or ``item``).

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trained", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--methods", default="off,ngram,draft,eagle,eagle_tree")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    folder = args.trained
    tree = {"topk": 4, "num_draft_tokens": 16}
    specs = {
        "off": None,
        "ngram": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4},
        "draft": {"model": str(folder / "draft"), "num_speculative_tokens": 4},
        "eagle": {"method": "eagle", "model": str(folder / "eagle"), "num_speculative_tokens": 4},
        "eagle_tree": {
            "method": "eagle",
            "model": str(folder / "eagle"),
            "num_speculative_tokens": 4,
            "tree": tree,
        },
    }
    text = json.loads((folder / "prompts.json").read_text())[0][:200]
    prompt = [b + 3 for b in text.encode()]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    reference = None
    for name in args.methods.split(","):
        spec = specs[name]
        config = EngineConfig(
            model=str(folder / "target"),
            dtype=args.dtype,
            device=args.device,
            max_num_seqs=4,
            kv_cache_memory_bytes=1 << 30,
            speculative_config=json.dumps(spec) if spec else None,
        )
        engine = LLMEngine(config)
        engine.generate([prompt], params)  # warm-up, graphs
        engine.generate([prompt], params)
        sync(args.device)
        rounds = engine.scheduler.num_drafts
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        out = engine.generate([prompt], params)
        sync(args.device)
        profiler.disable()
        wall = time.perf_counter() - start
        rounds = max(1, engine.scheduler.num_drafts - rounds)
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
        }
        if name == "off":
            reference = out
        elif reference is not None:
            summary[name]["equal_to_off"] = out == reference
        print(name, json.dumps(summary[name]))
        del engine
        torch.cuda.empty_cache() if args.device.startswith("cuda") else None
    (args.out / "profile-spec.json").write_text(json.dumps(summary, indent=2, default=str))


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
    for name in ("chain_graphs", "tree_graphs"):
        graphs = getattr(proposer, name, None)
        if graphs is not None:
            out[name.removesuffix("_graphs") + "s"] = graphs.replays
    return out


if __name__ == "__main__":
    main()
