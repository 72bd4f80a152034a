"""Multi-LoRA throughput: 8 different adapters mixed in every batch, against the base model
alone, on the same workload in the same run.

A fixed synthetic workload (by default 48 requests, prompt lengths 32-256, 32 output tokens,
fixed seed, ignore_eos) on a random-weight Llama-shaped checkpoint. The reference is an
engine without LoRA serving every request on the base model; the measured engine has
``--enable-lora --max-loras 8`` and request ``i`` asks for adapter ``i % 8`` (rank 16, on
every projection: q, k, v, o, gate, up, down), so every step mixes all of them. The key
``lora_mixed_over_base_tok_s`` is output tokens per second, mixed over base.

    python bench/lora.py                                            # CPU, tiny preset
    python bench/lora.py --device cuda --preset llama-3.1-8b --json bench/results/lora-h200.json
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
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import PRESETS, make_checkpoint, sync

from engine_service.engine import EngineConfig, LLMEngine, SamplingParams

PROJECTIONS = {
    "self_attn.q_proj": ("hidden", "q"),
    "self_attn.k_proj": ("hidden", "kv"),
    "self_attn.v_proj": ("hidden", "kv"),
    "self_attn.o_proj": ("q", "hidden"),
    "mlp.gate_proj": ("hidden", "inter"),
    "mlp.up_proj": ("hidden", "inter"),
    "mlp.down_proj": ("inter", "hidden"),
}


def make_adapter(path: Path, preset: str, rank: int, seed: int) -> None:
    """A PEFT-format adapter of ``rank`` on every projection of every layer."""
    shape = PRESETS[preset]
    head_dim = shape.get("head_dim", shape["hidden_size"] // shape["num_attention_heads"])
    sizes = {
        "hidden": shape["hidden_size"],
        "q": shape["num_attention_heads"] * head_dim,
        "kv": shape["num_key_value_heads"] * head_dim,
        "inter": shape["intermediate_size"],
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape["num_hidden_layers"]):
        for module, (fan_in, fan_out) in PROJECTIONS.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            a = torch.randn(rank, sizes[fan_in], generator=generator) * 0.01
            b = torch.randn(sizes[fan_out], rank, generator=generator) * 0.01
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": [m.rsplit(".", 1)[-1] for m in PROJECTIONS],
        "bias": "none",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))


def workload(n: int, vocab: int, prompt_range, output_len: int, seed: int = 0):
    rng = random.Random(seed)
    return [
        ([rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_range))], output_len)
        for _ in range(n)
    ]


def run(args, path: Path, requests, adapters: list[str] | None) -> dict:
    lora = dict(
        enable_lora=True,
        max_loras=len(adapters),
        max_lora_rank=args.rank,
        lora_modules=tuple((name, str(path.parent / name)) for name in adapters),
    ) if adapters else {}  # fmt: skip
    engine = LLMEngine(
        EngineConfig(
            model=str(path),
            dtype=args.dtype,
            device=args.device,
            max_num_seqs=args.batch_size,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=False,
            **lora,
        )
    )
    warm = SamplingParams(max_tokens=4, ignore_eos=True)
    for i, name in enumerate(adapters or [None]):
        engine.add_request(f"warmup-{i}", requests[0][0][:16], warm, adapter=name)
    while engine.has_unfinished():
        engine.step()
    sync(args.device)
    start = time.perf_counter()
    for i, (prompt, out_len) in enumerate(requests):
        params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
        adapter = adapters[i % len(adapters)] if adapters else None
        engine.add_request(str(i), prompt, params, adapter=adapter)
    produced = 0
    while engine.has_unfinished():
        for out in engine.step():
            produced += len(out.new_token_ids)
    sync(args.device)
    elapsed = time.perf_counter() - start
    engine.close()
    del engine
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"output_tokens": produced, "seconds": elapsed, "tok_s": produced / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--prompt-min", type=int, default=32)
    parser.add_argument("--prompt-max", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        make_checkpoint(path, args.preset, getattr(torch, args.dtype), args.device)
        names = [f"adapter-{i}" for i in range(args.adapters)]
        for seed, name in enumerate(names):
            make_adapter(Path(tmp) / name, args.preset, args.rank, seed)
        requests = workload(
            args.requests,
            PRESETS[args.preset]["vocab_size"],
            (args.prompt_min, args.prompt_max),
            args.output_len,
        )
        base = run(args, path, requests, None)
        mixed = run(args, path, requests, names)

    ratio = mixed["tok_s"] / base["tok_s"]
    print(f"{'run':<28}{'output tok/s':>14}{'seconds':>10}")
    print(f"{'base model alone':<28}{base['tok_s']:>14.1f}{base['seconds']:>10.2f}")
    label = f"{args.adapters} adapters mixed (r={args.rank})"
    print(f"{label:<28}{mixed['tok_s']:>14.1f}{mixed['seconds']:>10.2f}")
    print(f"lora_mixed_over_base_tok_s = {ratio:.3f}")
    result = {
        "lora_mixed_over_base_tok_s": ratio,
        "base": base,
        "mixed": mixed,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        },
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
