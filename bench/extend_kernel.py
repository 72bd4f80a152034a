"""Paged extend attention (Triton) against the SDPA path, on the same inputs in the same run.

The SDPA path is what the engine's reference backend does on CUDA: prefill chunks one
sequence at a time (gather its keys through the block table, repeat the KV heads up to the
query heads, flash / memory-efficient SDPA with a causal or dense mask), decodes in one padded
batched call (gather every decode's blocks, dense length/window mask). Its plan (slices, block
ids, decode tables and masks) is built outside the timed region, as the old metadata did.
For decode batches the separate paged decode kernel (`attention/triton_decode.py`) is timed
too, when that module is present.

    python bench/extend_kernel.py --json bench/results/extend_kernel.json [--sweep]

Prints one row per (model shape, scenario): kernel and SDPA milliseconds, their ratio
(`sdpa_ms / kernel_ms`, > 1 means the kernel is faster), the decode kernel's time, and the
largest difference between the two outputs. The JSON's `ratio` is the geometric mean of the
per-case ratios; `ratio_prefill` and `ratio_decode` split it. `--sweep` also times a few
tile shapes (and, for decodes, key splits) per case and reports the fastest, for tuning
`pick_config`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_service.engine.triton_extend import ExtendConfig, paged_extend_attention
from engine_service.layers.paged_attention import AttentionMetadata
from tests.engine_service.extend_reference import SequenceSpec, build_case

DEVICE, DTYPE = "cuda", torch.bfloat16

# (q heads, kv heads, head_dim): Llama-3.2-1B, Llama-3.1-8B, a GQA group of 8 (70B-like).
SHAPES = {"1b": (32, 8, 64), "8b": (32, 8, 128), "g8": (64, 8, 128)}


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "prefill" or "decode"
    specs: tuple[SequenceSpec, ...]
    window: int | None = None


def scenarios() -> list[Scenario]:
    def many(n, spec):
        return (spec,) * n

    return [
        Scenario("prompt 4096", "prefill", (SequenceSpec(0, 4096),)),
        Scenario("4 x chunk 512 @ 4096", "prefill", many(4, SequenceSpec(4096, 512))),
        Scenario("chunk 2048 @ 8192", "prefill", (SequenceSpec(8192, 2048),)),
        Scenario("chunk 2048 @ 8192 w4096", "prefill", (SequenceSpec(8192, 2048),), 4096),
        Scenario(
            "64 decodes + chunk 512",
            "prefill",
            (*many(64, SequenceSpec(2048, 1)), SequenceSpec(2048, 512)),
        ),
        Scenario("16 trees of 16 @ 2048", "prefill", many(16, SequenceSpec(2048, 16, tree=True))),
        Scenario("decode 1 @ 8192", "decode", (SequenceSpec(8192, 1),)),
        Scenario("decode 16 @ 4096", "decode", many(16, SequenceSpec(4096, 1))),
        Scenario("decode 64 @ 2048", "decode", many(64, SequenceSpec(2048, 1))),
        Scenario("decode 256 @ 1024", "decode", many(256, SequenceSpec(1024, 1))),
        Scenario("decode 64 @ 2048 w1024", "decode", many(64, SequenceSpec(2048, 1)), 1024),
    ]


class SdpaPath:
    """The reference backend's attention (no K/V write), planned once like its metadata."""

    _KERNELS: ClassVar = [
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]

    def __init__(self, kv_cache, layer, meta: AttentionMetadata, window):
        self.keys, self.values = kv_cache[:, layer, 0], kv_cache[:, layer, 1]
        self.window = window
        self.meta = meta
        block_size = kv_cache.shape[3]
        starts = meta.query_start_loc_host.tolist()
        lens = meta.seq_lens_host.tolist()
        device = kv_cache.device
        decode_rows, decode_seqs = [], []
        self.chunks = []
        for i, seq_len in enumerate(lens):
            start, end = starts[i], starts[i + 1]
            if end - start == 1 and meta.custom_mask is None:
                decode_rows.append(start)
                decode_seqs.append(i)
                continue
            nblocks = -(-seq_len // block_size)
            mask = None
            context = seq_len - (end - start)
            if meta.custom_mask is not None:
                n = end - start
                offset = int(meta.custom_mask_offsets[i])
                fresh = meta.custom_mask[offset : offset + n * n].view(n, n)
                mask = torch.cat(
                    [torch.ones(n, context, dtype=torch.bool, device=device), fresh], 1
                )
            self.chunks.append(
                (start, end, context, seq_len, meta.block_tables[i, :nblocks].long(), mask)
            )
        self.decode_rows = torch.tensor(decode_rows, dtype=torch.long, device=device)
        if decode_seqs:
            seqs = torch.tensor(decode_seqs, device=device)
            width_blocks = -(-max(lens[i] for i in decode_seqs) // block_size)
            self.decode_tables = meta.block_tables[seqs, :width_blocks].long()
            width = width_blocks * block_size
            key_pos = torch.arange(width, device=device)
            seq_lens = meta.seq_lens[seqs].long()[:, None]
            mask = key_pos[None, :] < seq_lens
            if window is not None:
                mask &= key_pos[None, :] > seq_lens - 1 - window
            self.decode_mask = mask[:, None, None, :]

    def __call__(self, q, scale):
        out = torch.empty_like(q)
        group = q.shape[1] // self.keys.shape[2]
        if len(self.decode_rows):
            num, width = (
                self.decode_tables.shape[0],
                self.decode_tables.shape[1] * self.keys.shape[1],
            )
            keys = self.keys[self.decode_tables].reshape(num, width, *self.keys.shape[2:])
            values = self.values[self.decode_tables].reshape(num, width, *self.values.shape[2:])
            keys = keys.repeat_interleave(group, dim=2).transpose(1, 2)
            values = values.repeat_interleave(group, dim=2).transpose(1, 2)
            with sdpa_kernel(self._KERNELS, set_priority=True):
                attn = F.scaled_dot_product_attention(
                    q[self.decode_rows].unsqueeze(2),
                    keys,
                    values,
                    attn_mask=self.decode_mask,
                    scale=scale,
                )
            out[self.decode_rows] = attn.squeeze(2)
        for start, end, context, seq_len, block_ids, tree in self.chunks:
            query = q[start:end].transpose(0, 1).unsqueeze(0)
            keys = self.keys[block_ids].flatten(0, 1)[:seq_len].repeat_interleave(group, dim=1)
            values = self.values[block_ids].flatten(0, 1)[:seq_len].repeat_interleave(group, dim=1)
            keys, values = keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0)
            if tree is None and context == 0 and self.window is None:
                mask = None
            elif tree is not None:
                mask = tree
            else:
                q_pos = torch.arange(context, seq_len, device=q.device)
                k_pos = torch.arange(seq_len, device=q.device)
                mask = k_pos[None, :] <= q_pos[:, None]
                if self.window is not None:
                    mask &= k_pos[None, :] > q_pos[:, None] - self.window
            with sdpa_kernel(self._KERNELS, set_priority=True):
                attn = F.scaled_dot_product_attention(
                    query, keys, values, attn_mask=mask, is_causal=mask is None, scale=scale
                )
            out[start:end] = attn.squeeze(0).transpose(0, 1)
        return out


def decode_kernel(case, scale, window):
    """The separate paged decode kernel on a pure-decode case, or None without it."""
    try:
        from engine_service.engine.attention.triton_decode import paged_decode_attention
    except ImportError:
        return None
    cache = case.kv_cache[:, case.layer]
    return lambda: paged_decode_attention(
        case.q, cache[:, 0], cache[:, 1], case.meta.block_tables, case.meta.seq_lens, scale, window
    )


# Tile shapes tried by --sweep, by scenario kind; decodes also try key splits.
SWEEP = {
    "prefill": [
        ExtendConfig(rows=64, block_n=64, num_warps=4, num_stages=3),
        ExtendConfig(rows=128, block_n=64, num_warps=8, num_stages=3),
        ExtendConfig(rows=64, block_n=32, num_warps=4, num_stages=3),
        ExtendConfig(rows=64, block_n=64, num_warps=4, num_stages=4),
        ExtendConfig(rows=32, block_n=64, num_warps=4, num_stages=3),
    ],
    "decode": [
        ExtendConfig(rows=16, block_n=128, num_warps=4, num_stages=3, num_splits=splits)
        for splits in (None, 1, 4, 16, 32)
    ]
    + [
        ExtendConfig(rows=64, block_n=64, num_warps=4, num_stages=3, num_splits=splits)
        for splits in (None, 1, 4, 16, 32)
    ],
}


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=60, return_mode="median")


def measure(shape: str, sc: Scenario, sweep: bool) -> tuple[dict, dict | None]:
    """One case: its table row, and its sweep (None without ``sweep``)."""
    num_heads, num_kv_heads, head_dim = SHAPES[shape]
    scale = head_dim**-0.5
    case = build_case(
        list(sc.specs),
        num_kv_heads=num_kv_heads,
        group=num_heads // num_kv_heads,
        head_dim=head_dim,
        block_size=16,
        dtype=DTYPE,
        device=DEVICE,
        spare_blocks=1,
    )
    # NaN slots are for correctness checks; here they would only poison the SDPA path's
    # padded decode gather (a masked NaN still propagates through its softmax).
    case.kv_cache.nan_to_num_(0.0)

    def kernel(config=None):
        return paged_extend_attention(
            case.q, case.kv_cache, case.layer, case.meta, scale, sc.window, config
        )

    sdpa = SdpaPath(case.kv_cache, case.layer, case.meta, sc.window)
    diff = (kernel().float() - sdpa(case.q, scale).float()).abs().max().item()
    kernel_ms = bench_ms(kernel)
    sdpa_ms = bench_ms(lambda: sdpa(case.q, scale))
    dec = decode_kernel(case, scale, sc.window) if sc.kind == "decode" else None
    try:
        dec_ms = bench_ms(dec) if dec else None
    except TypeError:  # the decode kernel's signature moved on
        dec_ms = None
    row = dict(
        shape=shape,
        scenario=sc.name,
        kind=sc.kind,
        kernel_ms=kernel_ms,
        sdpa_ms=sdpa_ms,
        ratio=sdpa_ms / kernel_ms,
        decode_kernel_ms=dec_ms,
        max_abs_diff=diff,
    )
    if sc.kind == "decode" and sc.window is None:
        kv_bytes = sum(s.context_len + 1 for s in sc.specs) * num_kv_heads * head_dim * 2 * 2
        row["kernel_kv_gbps"] = kv_bytes / kernel_ms / 1e6
    dec_text = f"{dec_ms:17.4f}" if dec_ms is not None else f"{'-':>17}"
    print(
        f"{shape:5} {sc.name:26} {kernel_ms:10.4f} {sdpa_ms:10.4f} {row['ratio']:7.2f} "
        f"{dec_text} {diff:9.2e}",
        flush=True,
    )
    if not sweep:
        return row, None
    timed = []
    for config in SWEEP[sc.kind]:
        try:
            timed.append((bench_ms(lambda config=config: kernel(config)), config))
        except Exception as error:  # a shape that does not fit this case
            print(f"      sweep {config}: {type(error).__name__}", flush=True)
    timed.sort(key=lambda t: t[0])
    for ms, config in timed[:3]:
        print(f"      sweep {ms:8.4f} ms  {config}", flush=True)
    results = [dict(ms=ms, **asdict(config)) for ms, config in timed]
    return row, dict(shape=shape, scenario=sc.name, results=results)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--shapes", default=",".join(SHAPES), help="comma-separated: " + ",".join(SHAPES)
    )
    parser.add_argument("--sweep", action="store_true", help="also time the SWEEP tile shapes")
    parser.add_argument("--sweep-shapes", default="8b", help="shapes to sweep (default 8b)")
    parser.add_argument(
        "--sweep-kinds", default="prefill,decode", help="scenario kinds to sweep (default both)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2

    rows, sweeps = [], []
    print(
        f"{'shape':5} {'scenario':26} {'kernel ms':>10} {'sdpa ms':>10} {'ratio':>7} "
        f"{'decode-kernel ms':>17} {'max diff':>9}"
    )
    for shape in args.shapes.split(","):
        for sc in scenarios():
            sweep = (
                args.sweep
                and shape in args.sweep_shapes.split(",")
                and sc.kind in args.sweep_kinds.split(",")
            )
            row, swept = measure(shape, sc, sweep)
            rows.append(row)
            if swept:
                sweeps.append(swept)
            torch.cuda.empty_cache()

    def geomean(values):
        values = list(values)
        return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None

    summary = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        ratio=geomean(r["ratio"] for r in rows),
        ratio_prefill=geomean(r["ratio"] for r in rows if r["kind"] == "prefill"),
        ratio_decode=geomean(r["ratio"] for r in rows if r["kind"] == "decode"),
        decode_kernel_over_extend=geomean(
            r["decode_kernel_ms"] / r["kernel_ms"] for r in rows if r["decode_kernel_ms"]
        ),
        cases=rows,
        sweeps=sweeps,
    )
    print(
        f"ratio (sdpa/kernel, geomean) {summary['ratio']:.2f}: prefill {summary['ratio_prefill']:.2f}, "
        f"decode {summary['ratio_decode']:.2f}; decode kernel / extend kernel "
        f"{summary['decode_kernel_over_extend'] or float('nan'):.2f}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
