"""Loads a Hugging Face checkpoint (local folder or hub id) into one of our model classes.

The model is built on the meta device and the checkpoint's tensors are assigned straight in,
so no memory is spent initialising weights that are overwritten at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from engine_service.engine.attention import AttentionBackend
from engine_service.models.config import ModelConfig
from engine_service.models.layers import CausalLM
from engine_service.models.registry import resolve_architecture

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A local folder as is; anything else is a hub id, downloaded (config, weights,
    tokenizer files) through the Hugging Face cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {model!r} does not exist or is not a folder")
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            model,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"],
        )
    )


def resolve_dtype(name: str, config_dtype: str | None) -> torch.dtype:
    if name == "auto":
        name = config_dtype or "float32"
    if name not in _DTYPES:
        raise ValueError(
            f"dtype {name!r} is not supported; choose auto, float32, bfloat16 or float16"
        )
    return _DTYPES[name]


def read_config(path: Path) -> tuple[dict, ModelConfig, type[CausalLM]]:
    raw = json.loads((path / "config.json").read_text())
    model_cls = resolve_architecture(raw.get("architectures"))
    config = model_cls.parse_config(raw)
    generation_path = path / "generation_config.json"
    if generation_path.exists():
        eos = json.loads(generation_path.read_text()).get("eos_token_id")
        if eos is not None:
            config.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
    return raw, config, model_cls


# Our stacked projections and the checkpoint tensors they are built from, in order.
STACKED_PROJECTIONS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def _checkpoint_name_of(name: str) -> tuple[str, int] | None:
    """For a checkpoint tensor that goes into a stacked projection: (our name, its slot)."""
    for stacked, parts in STACKED_PROJECTIONS.items():
        for slot, part in enumerate(parts):
            marker = f".{part}."
            if marker in name:
                return name.replace(marker, f".{stacked}."), slot
    return None


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    return files


def load_model(
    model: str,
    backend: AttentionBackend,
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> tuple[CausalLM, ModelConfig, torch.dtype]:
    """Build our implementation of the checkpoint's architecture with its weights loaded."""
    path = resolve_model_path(model, revision)
    _, config, model_cls = read_config(path)
    torch_dtype = resolve_dtype(dtype, config.torch_dtype)
    device = torch.device(device)
    with torch.device("meta"):
        net = model_cls(config, backend)

    expected = set(net.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    load_device = "cpu" if device.type == "meta" else str(device)
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt", device=load_device) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                stacked = _checkpoint_name_of(name)
                if stacked is not None and stacked[0] in expected:
                    pieces.setdefault(stacked[0], {})[stacked[1]] = f.get_tensor(name)
                elif name in expected:
                    state[name] = f.get_tensor(name).to(torch_dtype)
    for name, parts in pieces.items():
        count = len(next(p for s, p in STACKED_PROJECTIONS.items() if f".{s}." in name))
        if len(parts) == count:
            state[name] = torch.cat([parts[i] for i in range(count)]).to(torch_dtype)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing = expected - state.keys()
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights: {sorted(missing)[:8]}")
    net.load_state_dict(state, strict=False, assign=True)
    net.tie_weights()
    # Buffers built at construction (rotary frequencies) still live on the CPU.
    net.to(device)
    net.eval()
    return net, config, torch_dtype
