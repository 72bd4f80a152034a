"""EAGLE draft heads in their published checkpoint layouts: EAGLE-1 and EAGLE-3.

A head drafts from the target's features instead of from tokens alone. At cache index ``p``
it reads the target's feature row of token ``p`` and the embedding of token ``p + 1`` (the
input shifted by one), and predicts token ``p + 2``; drafting further, it feeds its own
output back as the next position's hidden state::

    EAGLE-1 (e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B)        EAGLE-3 (e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B)
    feature: the target's final normed hidden [H]          feature: inputs of 3 target layers [3H]
                                                           hidden = fc(feature)          fc [H, 3H]
    x = fc(cat(embed(t), hidden))      fc [H, 2H] (+bias)  x = cat(norm(embed(t)), hidden_norm(hidden))
    layers.N (layer 0 has no input_layernorm)              midlayer: attention over x (2H wide),
    out = x after the layers (no final norm)                 residual = hidden, then the MLP
    logits = the target's lm_head(out)                     logits = lm_head(norm(out)), a reduced
                                                             vocabulary; target id = i + d2t[i]
    next hidden = out                                      next hidden = out (before the norm)

Checkpoint names have no ``model.`` prefix (``fc.weight``, ``layers.0.self_attn.q_proj``,
``midlayer.hidden_norm``, ``d2t``); a prefixed copy loads too. ``embed_tokens`` is the
target's when the checkpoint has none (EAGLE-3 checkpoints usually do not ship it), and an
EAGLE-1 head always uses the target's ``lm_head``. ``t2d`` (the reverse map) is not needed.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from engine_service.layers.attention import Attention
from engine_service.layers.linear import ReplicatedLinear
from engine_service.layers.mlp import GatedMLP
from engine_service.layers.norms import RMSNorm
from engine_service.layers.paged_attention import AttentionBackend, AttentionMetadata
from engine_service.layers.parallel import SINGLE
from engine_service.layers.rotary import RotaryEmbedding
from engine_service.models.config import ModelConfig
from engine_service.models.dense import STACKED_WEIGHT_MAPPING, DenseDecoderLayer
from engine_service.models.hidden_states import HiddenStateStore
from engine_service.models.weights import load_weights, materialize


class EagleHead(nn.Module, abc.ABC):
    """What the proposer relies on in a head, whichever EAGLE version."""

    config: ModelConfig
    # Target ids of the head's vocabulary rows (EAGLE-3's reduced vocabulary); None: same.
    draft_to_target: torch.Tensor | None = None

    @abc.abstractmethod
    def feature_store(
        self, target: ModelConfig, num_blocks: int, block_size: int, dtype, device
    ) -> HiddenStateStore:
        """The store of the target features this head reads."""

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The target's feature rows to the head's hidden input width."""
        return features

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def draft_vocab_size(self) -> int:
        """Columns of :meth:`compute_logits`: the head's vocabulary (EAGLE-3's reduced one,
        or the target's when it shares the target's ``lm_head``)."""
        return self.config.vocab_size

    @abc.abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """``input_ids [T]`` (each the token after the position), ``hidden [T, H]`` to the
        head's output ``[T, H]``, which is also the next position's hidden input."""

    @abc.abstractmethod
    def compute_logits(self, out: torch.Tensor) -> torch.Tensor:
        """Logits over the head's vocabulary."""


class Eagle1Head(EagleHead):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, fc_bias: bool) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.fc = ReplicatedLinear(2 * h, h, bias=fc_bias)
        self.layers = nn.ModuleList(
            DenseDecoderLayer(config, i, backend, SINGLE, qk_norm=False)
            for i in range(config.num_layers)
        )
        # The first layer reads fc's output as is (EAGLE's cnets: no input norm there).
        self.layers[0].input_layernorm = nn.Identity()
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.lm_head: nn.Module | None = None  # the target's, attached after loading

    def feature_store(self, target, num_blocks, block_size, dtype, device) -> HiddenStateStore:
        return HiddenStateStore((), True, target.hidden_size, num_blocks, block_size, dtype, device)

    def forward(self, input_ids, positions, hidden, kv_cache, meta):
        x = self.fc(torch.cat((self.embed_tokens(input_ids), hidden.to(self.fc.weight.dtype)), -1))
        cos_sin = self.rotary_emb.cos_sin(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos_sin, kv_cache, meta)
        return x

    def compute_logits(self, out: torch.Tensor) -> torch.Tensor:
        assert self.lm_head is not None
        return _project(self.lm_head, out)


class Eagle3Layer(nn.Module):
    """EAGLE-3's ``midlayer``: attention over the normed embedding and the normed hidden
    state side by side (``2H`` wide), the hidden state as the residual, then the MLP."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend, norm_first: bool) -> None:
        super().__init__()
        h = config.hidden_size
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, config.rms_norm_eps)
        self.self_attn = Attention(
            h,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            0,
            backend,
            qkv_bias=config.qkv_bias,
            o_bias=config.o_bias,
            input_size=2 * h,
        )
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act, config.mlp_bias)
        self.norm_first = norm_first  # speculators' "norm_before_residual"

    def forward(self, embeds, hidden, cos_sin, kv_cache, meta) -> torch.Tensor:
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_first else hidden
        x = torch.cat((self.input_layernorm(embeds), normed), dim=-1)
        residual = residual + self.self_attn(x, cos_sin, kv_cache, meta)
        return residual + self.mlp(self.post_attention_layernorm(residual))


class Eagle3Head(EagleHead):
    def __init__(
        self,
        config: ModelConfig,
        backend: AttentionBackend,
        target_hidden_size: int,
        draft_vocab_size: int,
        aux_layers: tuple[int, ...] | None,
        norm_first: bool,
    ) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.aux_layers = aux_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.fc = ReplicatedLinear(3 * target_hidden_size, h)
        self.midlayer = Eagle3Layer(config, backend, norm_first)
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = ReplicatedLinear(h, draft_vocab_size)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def feature_store(self, target, num_blocks, block_size, dtype, device) -> HiddenStateStore:
        n = target.num_layers
        layers = self.aux_layers or (2, n // 2, n - 3)  # low, middle, high (EAGLE-3's choice)
        if len(layers) != 3:
            raise ValueError(f"an EAGLE-3 head reads 3 target layers, its config names {layers}")
        return HiddenStateStore(
            tuple(layers), False, target.hidden_size, num_blocks, block_size, dtype, device
        )

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.to(self.fc.weight.dtype))

    @property
    def draft_vocab_size(self) -> int:
        shared_vocab = getattr(self.lm_head, "vocab_size", None)  # the target's ParallelLMHead
        return shared_vocab or self.lm_head.weight.shape[0]

    def forward(self, input_ids, positions, hidden, kv_cache, meta):
        embeds = self.embed_tokens(input_ids)
        cos_sin = self.rotary_emb.cos_sin(positions, embeds.dtype)
        return self.midlayer(embeds, hidden.to(embeds.dtype), cos_sin, kv_cache, meta)

    def compute_logits(self, out: torch.Tensor) -> torch.Tensor:
        return _project(self.lm_head, self.norm(out))


def _project(lm_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The head's own ``lm_head`` is a plain linear layer; a shared target head projects
    through ``compute_logits``."""
    compute = getattr(lm_head, "compute_logits", None)
    return compute(hidden) if compute is not None else lm_head(hidden)


# -- loading ----------------------------------------------------------------------------------


def _checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a head checkpoint (safetensors, or EAGLE-1's ``pytorch_model.bin``),
    names without a leading ``model.``. Heads are one layer: reading them whole is cheap."""
    files = sorted(path.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    if files:
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    tensors[name] = f.get_tensor(name)
    else:
        bins = sorted(path.glob("pytorch_model*.bin"))
        if not bins:
            raise FileNotFoundError(f"no .safetensors or pytorch_model.bin weights in {path}")
        for file in bins:
            tensors.update(torch.load(file, map_location="cpu", weights_only=True))
    return {name.removeprefix("model."): tensor for name, tensor in tensors.items()}


def _aux_layers(raw: dict[str, Any]) -> tuple[int, ...] | None:
    ids = raw.get("eagle_aux_hidden_state_layer_ids")
    if ids is None:
        ids = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return tuple(int(i) for i in ids) if ids else None


def load_eagle_head(
    path: Path,
    version: int,
    target: nn.Module,
    target_config: ModelConfig,
    backend: AttentionBackend,
    dtype: torch.dtype,
    device: torch.device,
) -> EagleHead:
    """Build and load an EAGLE-``version`` head for ``target``; ``ValueError`` names what
    does not fit (another version's layout, hidden size, vocabulary)."""
    raw = json.loads((path / "config.json").read_text())
    config = ModelConfig.from_hf(raw, f"EAGLE-{version} head")
    tensors = _checkpoint(path)
    has_midlayer = any(name.startswith("midlayer.") for name in tensors)
    if version == 3 and not has_midlayer:
        raise ValueError(
            f"{path} is not an EAGLE-3 head (no midlayer.* tensors); "
            'for an EAGLE-1 head use "method": "eagle"'
        )
    if version == 1 and has_midlayer:
        raise ValueError(f'{path} is an EAGLE-3 head (midlayer.*); use "method": "eagle3"')
    if config.vocab_size != target_config.vocab_size:
        raise ValueError(
            f"the EAGLE head's vocabulary ({config.vocab_size} tokens) differs from the "
            f"target's ({target_config.vocab_size}): it was trained for another model"
        )
    if version == 1:
        if config.hidden_size != target_config.hidden_size:
            raise ValueError(
                f"the EAGLE head's hidden size ({config.hidden_size}) differs from the "
                f"target's ({target_config.hidden_size}): it was trained for another model"
            )
        with torch.device("meta"):
            head: EagleHead = Eagle1Head(config, backend, fc_bias="fc.bias" in tensors)
    else:
        if config.num_layers != 1:
            raise ValueError(
                f"EAGLE-3 heads with {config.num_layers} layers are not supported (one midlayer)"
            )
        target_hidden = raw.get("target_hidden_size") or config.hidden_size
        if target_hidden != target_config.hidden_size:
            raise ValueError(
                f"the EAGLE-3 head reads target features of width {target_hidden}, but the "
                f"target's hidden size is {target_config.hidden_size}"
            )
        draft_vocab = raw.get("draft_vocab_size") or config.vocab_size
        with torch.device("meta"):
            head = Eagle3Head(
                config,
                backend,
                target_hidden,
                draft_vocab,
                _aux_layers(raw),
                bool(raw.get("norm_before_residual", False)),
            )
        if "lm_head.weight" not in tensors and draft_vocab != target_config.vocab_size:
            raise ValueError(f"{path}: the EAGLE-3 head has no lm_head for its reduced vocabulary")
    # What the checkpoint leaves out comes from the target (shared, not copied).
    shared = {}
    if "embed_tokens.weight" not in tensors:
        shared["embed_tokens"] = target.model.embed_tokens
    if version == 1 or "lm_head.weight" not in tensors:
        shared["lm_head"] = target.lm_head
    for name in shared:
        setattr(head, name, None)
    materialize(head, device, dtype)
    head.packed_modules_mapping = STACKED_WEIGHT_MAPPING
    d2t = tensors.pop("d2t", None)
    load_weights(head, ((n, t) for n, t in tensors.items() if n != "t2d"), str(path))
    for name, module in shared.items():
        setattr(head, name, module)
    head.to(device)
    head.eval()
    if isinstance(head, Eagle3Head):
        rows = head.lm_head.weight.shape[0] if "lm_head" not in shared else None
        if d2t is not None:
            if rows is not None and d2t.shape[0] != rows:
                raise ValueError(f"{path}: d2t has {d2t.shape[0]} rows, lm_head {rows}")
            ids = torch.arange(d2t.shape[0]) + d2t.long()
            if int(ids.min()) < 0 or int(ids.max()) >= target_config.vocab_size:
                raise ValueError(f"{path}: d2t maps draft tokens outside the target's vocabulary")
            head.draft_to_target = ids.to(device)
        elif rows is not None and rows != target_config.vocab_size:
            raise ValueError(
                f"{path}: a reduced draft vocabulary ({rows} tokens) needs the d2t map"
            )
    return head
