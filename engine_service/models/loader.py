"""Loads a Hugging Face checkpoint (local folder or hub id) into one of our model classes.

The model is built on the meta device, then its parameters get uninitialised storage in the
target dtype and device, which each parameter's weight loader fills from the checkpoint (see
``weights.py``): no memory is spent initialising weights that are overwritten at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from engine_service.layers.paged_attention import AttentionBackend
from engine_service.layers.parallel import SINGLE, TensorParallel
from engine_service.models.causal_lm import CausalLM
from engine_service.models.config import ModelConfig
from engine_service.models.registry import resolve_architecture
from engine_service.models.weights import load_weights, materialize

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


def attention_needs(model: str, revision: str | None = None) -> frozenset[str]:
    """The attention-backend capability flags (``supports_sinks``, ...) the checkpoint's
    architecture needs, read from its config before anything is built."""
    _, _, model_cls = read_config(resolve_model_path(model, revision))
    needs = getattr(model_cls, "attention_needs", None)
    return needs() if needs is not None else frozenset()


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    return files


def _checkpoint_tensors(files: list[Path], device: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, one at a time, on ``device``."""
    for file in files:
        with safe_open(str(file), framework="pt", device=device) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, f.get_tensor(name)


def load_model(
    model: str,
    backend: AttentionBackend,
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    revision: str | None = None,
    tp: TensorParallel = SINGLE,
) -> tuple[CausalLM, ModelConfig, torch.dtype]:
    """Build our implementation of the checkpoint's architecture with its weights loaded
    (this rank's shards of them under tensor parallelism ``tp``)."""
    path = resolve_model_path(model, revision)
    _, config, model_cls = read_config(path)
    if tp.ep_size > 1 and not getattr(model_cls, "supports_tensor_parallel", False):
        raise ValueError(
            f"{config.architecture} does not support tensor, expert or data parallelism yet "
            "(--tensor-parallel-size 1 --data-parallel-size 1)"
        )
    torch_dtype = resolve_dtype(dtype, config.torch_dtype)
    device = torch.device(device)
    with torch.device("meta"):
        net = model_cls(config, backend, tp)
    load_device = torch.device("cpu") if device.type == "meta" else device
    materialize(net, load_device, torch_dtype)
    load_weights(net, _checkpoint_tensors(_weight_files(path), str(load_device)), str(path))
    after_load = getattr(net, "after_load", None)
    if after_load is not None:  # buffers a model could not build on the meta device
        after_load()
    # Buffers built at construction (rotary frequencies) still live on the CPU.
    net.to(device)
    net.eval()
    return net, config, torch_dtype
