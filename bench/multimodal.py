"""Images: what the prefix cache and the encoder-output cache save on a repeated image, and
what batching the vision encoder across requests buys.

A random-weight LLaVA-shaped checkpoint (CLIP tower at 224 px, 256 patches per image, and a
small Llama LM; ``--vision-layers`` and the sizes below set its cost) in our engine:

- **TTFT of a repeated image.** One request shows the image first (filling the caches);
  then the same request is timed from ``add_request`` to its first token, with the prefix
  cache and the encoder cache on, with only the encoder cache, and with both off (the
  reference: everything recomputed). ``ttft_cache_off_over_on`` is off over on.
- **Encoder throughput.** ``--images`` different images through the model's vision side
  (tower and projector) in one batched call, against one call per image.
  ``encoder_batched_over_single_images_per_s`` is images/s batched over one at a time.

    python bench/multimodal.py --json bench/results/multimodal-cpu.json
    python bench/multimodal.py --device cuda --dtype bfloat16 --json bench/results/mm-h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import sync

from engine_service.engine import EngineConfig, LLMEngine, SamplingParams
from tests.multimodal_support import (
    expand_prompt,
    make_llava_checkpoint,
    random_image,
    user_message,
)


def build(path: Path, vision_layers: int) -> Path:
    return make_llava_checkpoint(
        path,
        image_size=224,
        vision=dict(
            hidden_size=384,
            intermediate_size=1536,
            num_hidden_layers=vision_layers,
            num_attention_heads=6,
        ),
        text=dict(
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        ),
    )


def ttft(path: Path, args: argparse.Namespace, prefix: bool, encoder: bool) -> float:
    """Median seconds from add_request to the first token of a request repeating an image
    the engine saw in the request before."""
    engine = LLMEngine(
        EngineConfig(
            model=str(path),
            dtype=args.dtype,
            device=args.device,
            num_kv_blocks=512,
            block_size=16,
            enable_prefix_caching=prefix,
            mm_encoder_cache_gb=1.0 if encoder else 0.0,
            async_scheduling=False,
            enable_cuda_graphs=False,
        )
    )
    messages = user_message("You describe pictures in one sentence.", None, "What is this?")
    ids, images, _ = expand_prompt(path, messages, [random_image(7, 320, 240)])
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    times = []
    for run in range(args.repeats + 1):
        start = time.perf_counter()
        engine.add_request(f"r{run}", ids, params, images=images)
        while engine.has_unfinished():
            engine.step()
        sync(args.device)
        if run:  # run 0 shows the image for the first time
            times.append(time.perf_counter() - start)
    engine.close()
    return statistics.median(times)


def encoder_throughput(path: Path, args: argparse.Namespace) -> tuple[float, float]:
    """Images per second through the vision side: one batched call, and one call each."""
    engine = LLMEngine(
        EngineConfig(
            model=str(path), dtype=args.dtype, device=args.device, num_kv_blocks=16,
            block_size=16, enable_cuda_graphs=False,
        )
    )  # fmt: skip
    images = []
    for seed in range(args.images):
        messages = user_message(None, "x")
        _, found, _ = expand_prompt(path, messages, [random_image(100 + seed, 256, 256)])
        images += found
    model = engine.model
    with torch.inference_mode():
        model.encode_images(images[:2])  # warm up
        sync(args.device)
        batched, single = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            model.encode_images(images)
            sync(args.device)
            batched.append(time.perf_counter() - start)
            start = time.perf_counter()
            for image in images:
                model.encode_images([image])
            sync(args.device)
            single.append(time.perf_counter() - start)
    engine.close()
    return len(images) / statistics.median(batched), len(images) / statistics.median(single)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--vision-layers", type=int, default=6)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp) / "llava", args.vision_layers)
        on = ttft(path, args, prefix=True, encoder=True)
        encoder_only = ttft(path, args, prefix=False, encoder=True)
        off = ttft(path, args, prefix=False, encoder=False)
        batched, single = encoder_throughput(path, args)

    results = {
        "device": args.device if args.device != "cpu" else f"cpu ({platform.processor() or 'x86'})",
        "dtype": args.dtype,
        "tokens_per_image": 256,
        "ttft_caches_on_s": on,
        "ttft_encoder_cache_only_s": encoder_only,
        "ttft_caches_off_s": off,
        "ttft_cache_off_over_on": off / on,
        "ttft_cache_off_over_encoder_cache_only": off / encoder_only,
        "encoder_batched_images_per_s": batched,
        "encoder_single_images_per_s": single,
        "encoder_batched_over_single_images_per_s": batched / single,
        "images": args.images,
    }
    print(f"{'measure':<44}{'value':>12}")
    print(f"{'TTFT, repeated image, caches off (s)':<44}{off:>12.4f}")
    print(f"{'TTFT, repeated image, encoder cache only (s)':<44}{encoder_only:>12.4f}")
    print(f"{'TTFT, repeated image, both caches on (s)':<44}{on:>12.4f}")
    print(f"{'ttft_cache_off_over_on':<44}{off / on:>12.2f}")
    print(f"{'encoder images/s, one call per image':<44}{single:>12.2f}")
    print(f"{'encoder images/s, batched':<44}{batched:>12.2f}")
    print(f"{'encoder_batched_over_single_images_per_s':<44}{batched / single:>12.2f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
