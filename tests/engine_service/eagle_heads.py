"""EAGLE heads for the tests: random checkpoints in the published layouts, a head that nearly
copies a one-layer target (so drafts are often accepted), and a plain-torch reference of
what a head drafts, computed from ``transformers``' hidden states without any KV cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from engine_service.engine.spec.proposers import _Tree
from tests.engine_service.helpers import make_llama_checkpoint


def make_four_layer_target(path: Path) -> transformers.LlamaForCausalLM:
    """A random four-layer Llama saved to ``path`` (seed 11), so that an EAGLE-3 head has
    low, middle and high layers to read."""
    return make_llama_checkpoint(path, seed=11, num_hidden_layers=4)


def _shape(target: Path) -> dict:
    cfg = json.loads((target / "config.json").read_text())
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    return {
        "cfg": cfg,
        "h": h,
        "heads": heads,
        "kv": cfg["num_key_value_heads"],
        "hd": cfg.get("head_dim") or h // heads,
        "inter": cfg["intermediate_size"],
        "vocab": cfg["vocab_size"],
    }


def write_eagle_head(
    path: Path,
    target: Path,
    version: int,
    *,
    seed: int = 0,
    scale: float = 0.2,
    draft_vocab: int | None = None,
    aux_layers: tuple[int, ...] | None = None,
    with_embedding: bool = True,
    overrides: dict | None = None,
) -> Path:
    """A random head for ``target`` as EAGLE's own checkpoints name things: EAGLE-1
    ``fc`` [H, 2H] (+ bias) and ``layers.0.*`` without an input norm; EAGLE-3 ``fc``
    [H, 3H], ``midlayer.*`` (2H-wide attention input, ``hidden_norm``), ``norm``,
    ``lm_head`` over ``draft_vocab`` rows with ``d2t`` / ``t2d``."""
    s = _shape(target)
    h, vocab = s["h"], s["vocab"]
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=g)

    cfg = {**s["cfg"], "num_hidden_layers": 1}
    tensors: dict[str, torch.Tensor] = {}
    if version == 1:
        cfg["architectures"] = ["LlamaForCausalLM"]
        prefix, attn_in = "layers.0.", h
        tensors["fc.weight"] = rand(h, 2 * h)
        tensors["fc.bias"] = rand(h)
    else:
        cfg["architectures"] = ["LlamaForCausalLMEagle3"]
        prefix, attn_in = "midlayer.", 2 * h
        rows = draft_vocab or vocab
        cfg["draft_vocab_size"] = rows
        if aux_layers is not None:
            cfg["eagle_aux_hidden_state_layer_ids"] = list(aux_layers)
        tensors["fc.weight"] = rand(h, 3 * h)
        tensors[prefix + "input_layernorm.weight"] = 1 + rand(h)
        tensors[prefix + "hidden_norm.weight"] = 1 + rand(h)
        tensors["norm.weight"] = 1 + rand(h)
        tensors["lm_head.weight"] = rand(rows, h)
        kept = torch.randperm(vocab, generator=g)[:rows].sort().values
        tensors["d2t"] = kept - torch.arange(rows)
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[kept] = True
        tensors["t2d"] = t2d
    heads, kv, hd, inter = s["heads"], s["kv"], s["hd"], s["inter"]
    tensors[prefix + "self_attn.q_proj.weight"] = rand(heads * hd, attn_in)
    tensors[prefix + "self_attn.k_proj.weight"] = rand(kv * hd, attn_in)
    tensors[prefix + "self_attn.v_proj.weight"] = rand(kv * hd, attn_in)
    tensors[prefix + "self_attn.o_proj.weight"] = rand(h, heads * hd)
    tensors[prefix + "mlp.gate_proj.weight"] = rand(inter, h)
    tensors[prefix + "mlp.up_proj.weight"] = rand(inter, h)
    tensors[prefix + "mlp.down_proj.weight"] = rand(h, inter)
    tensors[prefix + "post_attention_layernorm.weight"] = 1 + rand(h)
    if with_embedding:
        tensors["embed_tokens.weight"] = rand(vocab, h)
    cfg.update(overrides or {})
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def make_copyable_target(path: Path, vocab: int, eos: int) -> transformers.LlamaForCausalLM:
    """A one-layer Llama whose embedding rows have unit RMS and whose norms are ones, so
    that its input norm changes nothing: an EAGLE-1 head can then redo its layer."""
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        rms_norm_eps=1e-8,
        eos_token_id=eos,
        bos_token_id=1,
    )
    torch.manual_seed(7)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.div_(emb.pow(2).mean(-1, keepdim=True).sqrt())
    model.save_pretrained(path)
    return model


def write_copying_head(path: Path, target: Path, seed: int = 3, feature_scale: float = 0.001):
    """An EAGLE-1 head that reruns the copyable target's layer on the next token: ``fc``
    passes the embedding through (plus a little of the feature), the layer is the target's.
    Its attention misses the first token (the head's history starts one later), so it
    agrees with the target often, not always."""
    model = transformers.LlamaForCausalLM.from_pretrained(target)
    h = model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    layer = {
        name: tensor
        for name, tensor in model.model.layers[0].state_dict().items()
        if not name.startswith("input_layernorm")
    }
    tensors = {f"layers.0.{name}": tensor for name, tensor in layer.items()}
    tensors["fc.weight"] = torch.cat(
        [torch.eye(h), feature_scale * torch.randn(h, h, generator=g)], dim=1
    )
    tensors["fc.bias"] = torch.zeros(h)
    cfg = {**model.config.to_dict(), "num_hidden_layers": 1}
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    return path


# -- reference: what a head drafts, from transformers' hidden states, no cache ----------------


class ReferenceHead:
    """Recomputes a head's drafts from scratch: the target's features from ``transformers``
    (``hidden_states[i]`` is layer ``i``'s input, ``[-1]`` the final normed output), the
    head as plain tensor maths with full causal attention."""

    def __init__(self, head_path: Path, target: transformers.LlamaForCausalLM, version: int):
        from safetensors.torch import load_file

        self.version = version
        self.target = target
        self.cfg = json.loads((head_path / "config.json").read_text())
        self.w = load_file(str(head_path / "model.safetensors"))
        self.embed = self.w.get("embed_tokens.weight", target.model.embed_tokens.weight)
        n = target.config.num_hidden_layers
        self.aux = tuple(self.cfg.get("eagle_aux_hidden_state_layer_ids") or (2, n // 2, n - 3))
        if version == 3 and "d2t" in self.w:
            self.ids = torch.arange(len(self.w["d2t"])) + self.w["d2t"]
        else:
            self.ids = None
        self.eps = self.cfg.get("rms_norm_eps", 1e-6)

    @torch.no_grad()
    def features(self, tokens: list[int]) -> torch.Tensor:
        hs = self.target(torch.tensor([tokens]), output_hidden_states=True).hidden_states
        if self.version == 1:
            return hs[-1][0]
        return torch.cat([hs[i][0] for i in self.aux], -1)

    def _norm(self, x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rope(self, x, positions):
        hd = x.shape[-1]
        theta = self.cfg.get("rope_theta", 10000.0)
        inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
        angles = positions[:, None].float() * inv[None]
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    def _layer(self, x, attn_in, residual, positions, prefix):
        w, heads, kv = self.w, self.cfg["num_attention_heads"], self.cfg["num_key_value_heads"]
        hd = self.cfg["hidden_size"] // heads
        t = x.shape[0]
        q = (attn_in @ w[prefix + "self_attn.q_proj.weight"].T).view(t, heads, hd)
        k = (attn_in @ w[prefix + "self_attn.k_proj.weight"].T).view(t, kv, hd)
        v = (attn_in @ w[prefix + "self_attn.v_proj.weight"].T).view(t, kv, hd)
        q, k = self._rope(q, positions), self._rope(k, positions)
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / hd**0.5
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, heads * hd)
        residual = residual + out @ w[prefix + "self_attn.o_proj.weight"].T
        y = self._norm(residual, w[prefix + "post_attention_layernorm.weight"])
        gate = y @ w[prefix + "mlp.gate_proj.weight"].T
        up = y @ w[prefix + "mlp.up_proj.weight"].T
        return (
            residual + (torch.nn.functional.silu(gate) * up) @ w[prefix + "mlp.down_proj.weight"].T
        )

    def run(self, tokens: list[int], hidden: torch.Tensor, positions: torch.Tensor):
        """Head outputs and logits (over target ids) for rows ``(tokens[j], hidden[j])``
        at ``positions`` (a path: causal attention over all rows)."""
        w = self.w
        e = self.embed[torch.tensor(tokens)]
        if self.version == 1:
            x = torch.cat([e, hidden], -1) @ w["fc.weight"].T + w.get("fc.bias", 0)
            out = self._layer(x, x, x, positions, "layers.0.")
            logits = out @ self.target.lm_head.weight.T
        else:
            normed = self._norm(hidden, w["midlayer.hidden_norm.weight"])
            attn_in = torch.cat([self._norm(e, w["midlayer.input_layernorm.weight"]), normed], -1)
            out = self._layer(hidden, attn_in, hidden, positions, "midlayer.")
            small = self._norm(out, w["norm.weight"]) @ w["lm_head.weight"].T
            if self.ids is None:
                logits = small
            else:
                logits = torch.full((len(tokens), self.target.config.vocab_size), float("-inf"))
                logits[:, self.ids] = small
        return out, logits

    @torch.no_grad()
    def chain(self, known: list[int], k: int) -> list[int]:
        """The greedy chain of ``k`` drafts after ``known``."""
        n = len(known)
        features = self.features(known[:-1])
        hidden = features if self.version == 1 else features @ self.w["fc.weight"].T
        tokens, rows = list(known[1:]), list(hidden)
        drafts = []
        for _ in range(k):
            out, logits = self.run(tokens, torch.stack(rows), torch.arange(len(tokens)))
            drafts.append(int(logits[-1].argmax()))
            tokens.append(drafts[-1])
            rows.append(out[-1])
        assert len(tokens) == n - 1 + k
        return drafts

    @torch.no_grad()
    def tree(self, known: list[int], depth: int, topk: int, size: int):
        """The token tree the proposer grows (same growth rule), with every node's logits
        from its own root-to-node path."""
        features = self.features(known[:-1])
        hidden = features if self.version == 1 else features @ self.w["fc.weight"].T
        base_tokens, base_rows = list(known[1:]), list(hidden)
        out, logits = self.run(base_tokens, torch.stack(base_rows), torch.arange(len(base_tokens)))
        root_out = out[-1]
        top = logits[-1].log_softmax(-1).topk(min(topk, size))
        tree = _Tree(size, top.indices.tolist(), top.values.tolist())
        outs: dict[int, torch.Tensor] = {0: root_out}
        for _ in range(1, depth):
            if not tree.growing:
                break
            rows = []
            for node in tree.frontier:
                path = []
                m = node
                while m:
                    path.append(m)
                    m = tree.parents[m - 1]
                path.reverse()
                tokens = base_tokens + [tree.tokens[m - 1] for m in path]
                hidden_rows = base_rows + [outs[tree.parents[m - 1]] for m in path]
                out, logits = self.run(tokens, torch.stack(hidden_rows), torch.arange(len(tokens)))
                outs[node] = out[-1]
                rows.append(logits[-1].log_softmax(-1))
            tree.extend(torch.stack(rows), topk)
        return tree.tokens, tree.parents
