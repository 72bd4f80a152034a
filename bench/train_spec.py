"""Train a target with real acceptance: a small Llama, its EAGLE-1 and EAGLE-3 heads, a draft.

No model hub is reachable, and random weights make acceptance meaningless, so this trains,
in one run and seeded, everything bench/spec.py measures on text that ships with Python:

1. a Llama-shaped **target** on the standard library's ``.py`` sources (code, comments and
   docstrings), byte-level tokens (id = byte + 3; 0 pad, 1 bos, 2 eos);
2. an **EAGLE-1 head** on the target's final normed hidden states (feature regression
   plus the target's next-token distribution through its ``lm_head``, as EAGLE-1 does);
3. an **EAGLE-3 head** on the inputs of three target layers (low, middle, high), with a
   reduced vocabulary of the most frequent tokens (``d2t`` / ``t2d``), trained on the
   target's distribution with two unrolled steps (its own output fed back, a short form of
   EAGLE-3's training-time test);
4. a one-layer **draft model** distilled from the target.

Checkpoints go to ``OUT/{target,eagle,eagle3,draft}`` in Hugging Face / published EAGLE
layouts, with ``OUT/prompts.json`` (held-out files' text for the benchmark) and
``OUT/train.json`` (the recipe and losses).

    python bench/train_spec.py --out /tmp/spec-trained                       # CPU toy, minutes
    python bench/train_spec.py --out /tmp/spec-trained --device cuda --size gpu
    python bench/train_spec.py --out /tmp/spec-trained --device cuda --size gpu-large
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from torch import nn

MODELS = ("eagle", "eagle3", "draft")
VOCAB = 259  # 256 bytes after pad 0, bos 1, eos 2
SIZES = {
    # (target layers, hidden, heads, kv heads, intermediate), seq len, batch, steps per model,
    # the target's peak learning rate (the proposers' is PROPOSER_LR)
    "toy": dict(
        layers=4, hidden=128, heads=4, kv=2, inter=344, seq=128, batch=16, steps=300, lr=3e-3
    ),
    "gpu": dict(
        layers=8, hidden=512, heads=8, kv=4, inter=1408, seq=256, batch=64, steps=1500, lr=3e-3
    ),
    # Deeper and wider (~300M parameters): a plain token costs more next to a one-layer head,
    # closer to the proportions of the 7-8B targets speculation is published on. At 3e-3 this
    # depth sat on a plateau (loss ~1.9 nats a byte) until the cosine brought the rate down,
    # and its greedy outputs ran into whitespace; rows of 512 cover the benchmark's prompts
    # and outputs (~430 tokens on `edit`).
    "gpu-large": dict(
        layers=24,
        hidden=1024,
        heads=16,
        kv=4,
        inter=2816,
        seq=512,
        batch=32,
        steps=600,
        lr=6e-4,
        target_steps=1500,
        # The one-layer heads train at ~20 steps a second on an H200; at 600 steps their loss
        # was still falling, and two trainings of one recipe reached 5.6 and 6.4 accepted
        # tokens a tree round. The draft model keeps ``steps``.
        head_steps=2000,
    ),
}
PROPOSER_LR = 3e-3


# -- data -------------------------------------------------------------------------------------


def corpus(seed: int, held_out: float = 0.05) -> tuple[torch.Tensor, list[str]]:
    """The standard library's sources as one byte-token tensor, and held-out files' text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    random.Random(seed).shuffle(files)
    cut = max(1, int(len(files) * held_out))
    texts = []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    train = b"".join(t.encode() + b"\n" for t in texts[cut:])
    ids = torch.frombuffer(bytearray(train), dtype=torch.uint8).long() + 3
    return ids, texts[:cut]


# What separates a snippet from its edited copy in the edit rows (code-editing prompts say,
# one way or another, that the same code comes again, changed).
EDIT_SEPARATORS = (
    "\n\n# the same, edited:\n",
    "\n\n# revised:\n",
    "\n\n# after the change:\n",
    "\n\n# new version:\n",
)


def batches(
    ids: torch.Tensor,
    seq: int,
    batch: int,
    generator: torch.Generator,
    device,
    edit_share: float = 0.0,
):
    """Rows of ``seq`` tokens from the corpus. A share ``edit_share`` of them are edits: a
    snippet, a separator, then the snippet again with a stretch of 8-24 tokens replaced by
    other corpus text. Code models copy the spans of their prompt that an edit keeps, which
    is what n-gram lookup feeds on; a target trained on plain files alone copies little."""
    separators = [torch.tensor(list(s.encode()), dtype=torch.long) + 3 for s in EDIT_SEPARATORS]
    while True:
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=generator).tolist()
        edits = (torch.rand(batch, generator=generator) < edit_share).tolist()
        rows = []
        for start, edit in zip(starts, edits, strict=True):
            if not edit:
                rows.append(ids[start : start + seq])
                continue
            pick = int(torch.randint(0, len(separators), (1,), generator=generator))
            separator = separators[pick]
            half = (seq - len(separator)) // 2 + 1
            snippet = ids[start : start + half]
            copy = snippet.clone()
            span = int(torch.randint(8, 25, (1,), generator=generator))
            at = int(torch.randint(0, half - span, (1,), generator=generator))
            other = int(torch.randint(0, len(ids) - span, (1,), generator=generator))
            copy[at : at + span] = ids[other : other + span]
            rows.append(torch.cat((snippet, separator, copy))[:seq])
        yield torch.stack(rows).to(device)


def schedule(step: int, steps: int, peak: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train(model: nn.Module, loss_fn, data, steps: int, lr: float, device, label: str) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else _Null()
    start, loss = time.perf_counter(), torch.tensor(0.0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = schedule(step, steps, lr)
        with autocast:
            loss = loss_fn(next(data))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(
                f"{label:8} step {step:5d} loss {loss.item():.3f} {time.perf_counter() - start:6.1f}s"
            )
    return float(loss.item())


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# -- EAGLE heads for training (the maths of engine_service/models/eagle.py) -------------------


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(
        x.dtype
    )


class HeadLayer(nn.Module):
    """One decoder layer reading ``attn_in`` (width ``attn_width``), residual ``residual``."""

    def __init__(self, h: int, heads: int, kv: int, inter: int, attn_width: int, eps: float):
        super().__init__()
        self.heads, self.kv, self.hd, self.eps = heads, kv, h // heads, eps
        self.q_proj = nn.Linear(attn_width, heads * self.hd, bias=False)
        self.k_proj = nn.Linear(attn_width, kv * self.hd, bias=False)
        self.v_proj = nn.Linear(attn_width, kv * self.hd, bias=False)
        self.o_proj = nn.Linear(heads * self.hd, h, bias=False)
        self.post_attention_layernorm = nn.Parameter(torch.ones(h))
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)

    def forward(self, attn_in, residual, offset: int = 0):
        b, t, _ = attn_in.shape
        q = self.q_proj(attn_in).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(attn_in).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(attn_in).view(b, t, self.kv, self.hd).transpose(1, 2)
        inv = 1.0 / 10000.0 ** (torch.arange(0, self.hd, 2, device=q.device).float() / self.hd)
        ang = (torch.arange(t, device=q.device).float() + offset)[:, None] * inv[None]
        cos, sin = (
            torch.cat([ang.cos()] * 2, -1).to(q.dtype),
            torch.cat([ang.sin()] * 2, -1).to(q.dtype),
        )

        def rope(x):
            x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2 :]
            return x * cos + torch.cat([-x2, x1], -1) * sin

        q, k = rope(q), rope(k)
        k = k.repeat_interleave(self.heads // self.kv, 1)
        v = v.repeat_interleave(self.heads // self.kv, 1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        residual = residual + self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        y = rms(residual, self.post_attention_layernorm, self.eps)
        return residual + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        names = ["q_proj", "k_proj", "v_proj", "o_proj"]
        out = {f"{prefix}self_attn.{n}.weight": getattr(self, n).weight for n in names}
        for n in ("gate_proj", "up_proj", "down_proj"):
            out[f"{prefix}mlp.{n}.weight"] = getattr(self, n).weight
        out[f"{prefix}post_attention_layernorm.weight"] = self.post_attention_layernorm
        return out


class Eagle1(nn.Module):
    def __init__(self, cfg: transformers.LlamaConfig):
        super().__init__()
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.layer = HeadLayer(
            h,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
            h,
            cfg.rms_norm_eps,
        )

    def forward(self, embeds, hidden):
        x = self.fc(torch.cat([embeds, hidden], -1))
        return self.layer(x, x)  # layer 0 has no input norm

    def state(self):
        return {
            "fc.weight": self.fc.weight,
            "fc.bias": self.fc.bias,
            **self.layer.state("layers.0."),
        }


class Eagle3(nn.Module):
    def __init__(self, cfg: transformers.LlamaConfig, draft_vocab: int):
        super().__init__()
        h, self.eps = cfg.hidden_size, cfg.rms_norm_eps
        self.fc = nn.Linear(3 * h, h, bias=False)
        self.input_layernorm = nn.Parameter(torch.ones(h))
        self.hidden_norm = nn.Parameter(torch.ones(h))
        self.layer = HeadLayer(
            h,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
            2 * h,
            cfg.rms_norm_eps,
        )
        self.norm = nn.Parameter(torch.ones(h))
        self.lm_head = nn.Linear(h, draft_vocab, bias=False)

    def forward(self, embeds, hidden, offset: int = 0):
        attn_in = torch.cat(
            [rms(embeds, self.input_layernorm, self.eps), rms(hidden, self.hidden_norm, self.eps)],
            -1,
        )
        return self.layer(attn_in, hidden, offset)

    def logits(self, out):
        return self.lm_head(rms(out, self.norm, self.eps))

    def state(self):
        return {
            "fc.weight": self.fc.weight,
            "midlayer.input_layernorm.weight": self.input_layernorm,
            "midlayer.hidden_norm.weight": self.hidden_norm,
            **self.layer.state("midlayer."),
            "norm.weight": self.norm,
            "lm_head.weight": self.lm_head.weight,
        }


def save_head(path: Path, tensors: dict, config: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu()
            for k, v in tensors.items()
        },
        str(path / "model.safetensors"),
    )
    (path / "config.json").write_text(json.dumps(config, indent=2))


# -- the run ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="toy", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, help="training steps per model (default: by size)")
    parser.add_argument(
        "--target-steps",
        type=int,
        help="training steps for the target (default: the size's, else --steps)",
    )
    parser.add_argument(
        "--lr", type=float, help="the target's peak learning rate (default: by size)"
    )
    parser.add_argument(
        "--reuse-target",
        action="store_true",
        help="load OUT/target from an earlier run instead of training it (proposers only)",
    )
    parser.add_argument("--seq", type=int, help="tokens per training row (default: by size)")
    parser.add_argument("--batch", type=int, help="rows per training step (default: by size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--edit-share",
        type=float,
        default=0.25,
        help="share of training rows that are a snippet and its edited copy (0: plain files)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        choices=MODELS,
        help="which of the proposers to train besides the target (default: all)",
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = dict(SIZES[args.size])
    size.update({k: v for k, v in (("seq", args.seq), ("batch", args.batch), ("lr", args.lr)) if v})
    steps = args.steps or size["steps"]
    # A size's own target steps apply unless --steps sets every model's.
    preset_target_steps = size.pop("target_steps", None)
    target_steps = args.target_steps or (None if args.steps else preset_target_steps) or steps
    preset_head_steps = size.pop("head_steps", None)
    head_steps = (None if args.steps else preset_head_steps) or steps
    generator = torch.Generator().manual_seed(args.seed)
    ids, held_out = corpus(args.seed)
    print(f"corpus: {len(ids) / 1e6:.1f}M byte tokens, {len(held_out)} held-out files")
    data = batches(ids, size["seq"], size["batch"], generator, device, args.edit_share)
    recipe: dict = {**size, "size": args.size, "seed": args.seed, "steps": steps}
    recipe["target_steps"] = target_steps
    recipe["head_steps"] = head_steps
    recipe["edit_share"] = args.edit_share
    recipe["models"] = ["target", *args.models]

    # 1. target
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=size["hidden"],
        intermediate_size=size["inter"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv"],
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if args.reuse_target:
        target = transformers.LlamaForCausalLM.from_pretrained(args.out / "target").to(device)
        cfg = target.config
        earlier = json.loads((args.out / "train.json").read_text())
        recipe.update({k: v for k, v in earlier.items() if k.endswith("_loss")})
        # Runs before these keys existed trained every target at 3e-3, for --steps.
        recipe["target_steps"] = earlier.get("target_steps", earlier.get("steps"))
        recipe["lr"] = earlier.get("lr", 3e-3)
        # The proposers are shaped after the target that is there, whatever --size says.
        size.update(
            layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            heads=cfg.num_attention_heads,
            kv=cfg.num_key_value_heads,
            inter=cfg.intermediate_size,
        )
        recipe.update({k: size[k] for k in ("layers", "hidden", "heads", "kv", "inter")})
        recipe["models"] = sorted(set(earlier["models"]) | set(recipe["models"]))
    else:
        target = transformers.LlamaForCausalLM(cfg).to(device)

        def lm_loss(model):
            return lambda x: model(x, labels=x).loss

        recipe["target_loss"] = train(
            target, lm_loss(target), data, target_steps, size["lr"], device, "target"
        )
        target.save_pretrained(args.out / "target")
    target.eval().requires_grad_(False)

    def features(x):
        with torch.no_grad():
            out = target(x, output_hidden_states=True)
        return out.hidden_states, out.logits.float()

    embed = target.model.embed_tokens
    layers = size["layers"]
    aux = (2, layers // 2, layers - 3) if layers >= 6 else (0, layers // 2, layers - 1)

    if "eagle" in args.models:
        # 2. EAGLE-1: at p, (token p+1, feature p) -> feature p+1 and the target's next token
        head1 = Eagle1(cfg).to(device)

        def eagle1_loss(x):
            hs, logits = features(x)
            f = hs[-1]
            out = head1(embed(x[:, 1:]), f[:, :-1])
            regress = F.smooth_l1_loss(out, f[:, 1:])
            want = logits[:, 1:].softmax(-1)
            got = target.lm_head(out).float().log_softmax(-1)
            return regress + 0.1 * -(want * got).sum(-1).mean()

        recipe["eagle_loss"] = train(
            head1, eagle1_loss, data, head_steps, PROPOSER_LR, device, "eagle"
        )
        head_cfg = {**cfg.to_dict(), "num_hidden_layers": 1, "architectures": ["LlamaForCausalLM"]}
        save_head(args.out / "eagle", head1.state(), head_cfg)

    if "eagle3" in args.models:
        # 3. EAGLE-3 over a reduced vocabulary: the most frequent tokens
        counts = torch.bincount(ids, minlength=VOCAB)
        draft_vocab = min(VOCAB, 128)
        kept = counts.topk(draft_vocab).indices.sort().values.to(device)
        head3 = Eagle3(cfg, draft_vocab).to(device)

        def eagle3_loss(x):
            hs, logits = features(x)
            feats = torch.cat([hs[i] for i in aux], -1)
            want = logits[..., kept].softmax(-1)  # the target's distribution on the kept tokens
            hidden = head3.fc(feats[:, :-2])
            loss = 0.0
            for unroll in range(2):  # step 2 reads step 1's outputs: the drafting it will do
                tokens = x[:, 1 + unroll : x.shape[1] - 1 + unroll]
                out = head3(embed(tokens), hidden, unroll)
                got = head3.logits(out).float().log_softmax(-1)
                loss = (
                    loss + -(want[:, 1 + unroll : want.shape[1] - 1 + unroll] * got).sum(-1).mean()
                )
                hidden = out
            return loss

        recipe["eagle3_loss"] = train(
            head3, eagle3_loss, data, head_steps, PROPOSER_LR, device, "eagle3"
        )
        t2d = torch.zeros(VOCAB, dtype=torch.bool)
        t2d[kept.cpu()] = True
        tensors = {**head3.state(), "d2t": kept.cpu() - torch.arange(draft_vocab), "t2d": t2d}
        save_head(
            args.out / "eagle3",
            tensors,
            {
                **cfg.to_dict(),
                "num_hidden_layers": 1,
                "architectures": ["LlamaForCausalLMEagle3"],
                "draft_vocab_size": draft_vocab,
                "eagle_aux_hidden_state_layer_ids": list(aux),
            },
        )

    if "draft" in args.models:
        # 4. a one-layer draft, distilled from the target
        draft_cfg = transformers.LlamaConfig(
            **{
                **cfg.to_dict(),
                "num_hidden_layers": 1,
                "hidden_size": size["hidden"] // 2,
                "intermediate_size": size["inter"] // 2,
                "num_attention_heads": size["heads"] // 2,
                "num_key_value_heads": max(1, size["kv"] // 2),
                "head_dim": None,
            }
        )
        draft = transformers.LlamaForCausalLM(draft_cfg).to(device)

        def distill(x):
            _, logits = features(x)
            got = draft(x).logits.float().log_softmax(-1)
            return -(logits.softmax(-1) * got).sum(-1).mean()

        recipe["draft_loss"] = train(draft, distill, data, steps, PROPOSER_LR, device, "draft")
        draft.save_pretrained(args.out / "draft")

    (args.out / "prompts.json").write_text(json.dumps(held_out))
    (args.out / "train.json").write_text(json.dumps(recipe, indent=2))
    print(json.dumps(recipe))


if __name__ == "__main__":
    main()
