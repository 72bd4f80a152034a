"""Checkpoint tensors into a model's parameters, through the model's weight mapping.

A model class declares ``packed_modules_mapping``: checkpoint name segment -> (our name
segment, shard id). A checkpoint tensor whose dotted name contains a mapped segment goes to
the parameter named with that segment replaced, through that parameter's
``weight_loader(param, tensor, shard_id)``; any other tensor goes to the parameter of the same
name with shard ``None``. For Llama::

    model.layers.3.self_attn.k_proj.weight  ──"k_proj": ("qkv_proj", "k")──▶
    model.layers.3.self_attn.qkv_proj.weight, shard "k"

Parameters list the shards they need (``param.shard_ids``); a parameter missing any of them
after loading is an error. Checkpoint tensors with no parameter (rotary caches, an untied
copy of tied embeddings) are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from engine_service.layers.linear import default_weight_loader


def resolve_name(name: str, mapping: dict[str, tuple[str, Any]]) -> tuple[str, Any]:
    """(our parameter name, shard id) for a checkpoint tensor name."""
    dotted = f".{name}."
    for source, (target, shard_id) in mapping.items():
        marker = f".{source}."
        if marker in dotted:
            return dotted.replace(marker, f".{target}.", 1)[1:-1], shard_id
    return name, None


def materialize(net: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every parameter still on the meta device uninitialised storage on ``device``
    (in ``dtype``, or fp32 for a parameter marked ``keep_fp32``).

    Parameter attributes (``weight_loader``, ``shard_ids``) carry over, and a parameter
    shared by two modules (tied embeddings) stays shared.
    """
    made: dict[int, nn.Parameter] = {}
    for module in net.modules():
        for name, param in module._parameters.items():
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:
                # Routers and their biases decide discrete choices: they stay in fp32.
                own = torch.float32 if getattr(param, "keep_fp32", False) else dtype
                real = nn.Parameter(
                    torch.empty(param.shape, dtype=own, device=device), requires_grad=False
                )
                real.__dict__.update(param.__dict__)
                made[id(param)] = real
            module._parameters[name] = made[id(param)]


def load_weights(net: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Load every mapped tensor of ``tensors`` into ``net``; raise if a parameter (or a shard
    of one) got nothing. ``source`` names the checkpoint in errors."""
    params = dict(net.named_parameters())
    mapping = getattr(net, "packed_modules_mapping", {})
    # A model may rename checkpoint tensors (older layouts of its family), and keep some
    # out of the mapping (a vision tower built from transformers modules keeps HF's names).
    rename = getattr(net, "checkpoint_name", None)
    unmapped: tuple[str, ...] = getattr(net, "unmapped_prefixes", ())
    loaded: dict[str, set[Any]] = {}
    for name, tensor in tensors:
        if rename is not None:
            name = rename(name)
        if unmapped and name.startswith(unmapped):
            target, shard_id = name, None
        else:
            target, shard_id = resolve_name(name, mapping)
        param = params.get(target)
        if param is None:
            continue
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor, shard_id)
        except ValueError as err:
            raise ValueError(f"checkpoint {source}: tensor {name}: {err}") from err
        loaded.setdefault(target, set()).add(shard_id)
    missing = []
    for name, param in params.items():
        wanted = getattr(param, "shard_ids", (None,))
        absent = [s for s in wanted if s not in loaded.get(name, ())]
        if absent == [None]:
            missing.append(name)
        elif absent:
            missing.append(f"{name} (shards {', '.join(map(repr, absent[:4]))})")
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"checkpoint {source} lacks weights: {'; '.join(missing[:8])}{more}")
