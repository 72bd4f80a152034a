"""The model fingerprint: what a KV block's bytes mean, so blocks of one model never load
into another.

The KV service addresses a block by ``fingerprint + block_hash``. The block hash
(:mod:`switchyard.block_hash`) names the tokens before the block (and the request's adapter,
cache salt and media); the fingerprint names everything else the bytes depend on: the
model's weights, the KV dtype, and the block's shape. Every part that writes or reads KV
blocks (engines, the KV service's tools, tests, benchmarks) computes it here::

    kv_fingerprint(checkpoint_id("/models/llama-3.2-1b"), torch.bfloat16, (16, 2, 16, 8, 64))
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FINGERPRINT_BYTES = 16

# Bytes read from each end of a weight file: enough to tell fine-tunes apart cheaply.
_SAMPLE_BYTES = 1 << 16


def checkpoint_id(model_dir: str | Path) -> str:
    """A hex digest of the checkpoint in ``model_dir``: its ``config.json`` and, for every
    ``*.safetensors`` file, its name, size and first and last 64 KiB. Copies of one
    checkpoint agree wherever they lie; fine-tunes of one architecture differ, without
    reading whole files. The directory's own path does not count."""
    digest = hashlib.blake2b(digest_size=16, person=b"switchyard-ckpt")
    root = Path(model_dir)
    config = root / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(root.glob("*.safetensors")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with weights.open("rb") as f:
            digest.update(f.read(_SAMPLE_BYTES))
            f.seek(max(0, size - _SAMPLE_BYTES))
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def kv_fingerprint(
    model: str,
    dtype: str | torch.dtype,
    block_shape: Sequence[int],
    tp_size: int = 1,
    kv_shard: int = 0,
) -> bytes:
    """The ``FINGERPRINT_BYTES`` fingerprint of KV blocks written by ``model`` (an engine
    passes :func:`checkpoint_id` of its checkpoint; any stable model name works for tools
    and tests) in ``dtype`` (``torch.bfloat16`` and ``"bfloat16"`` are the same) with one
    block shaped ``block_shape``, e.g. ``(num_layers, 2, block_size, num_kv_heads,
    head_dim)``. Each part is length-prefixed, so no two different inputs run together.

    A rank of a tensor-parallel engine (``tp_size`` > 1) caches one slice of the key/value
    heads, ``kv_shard`` (see ``engine_service.layers.parallel.kv_shard``; ranks that hold
    the same heads, or the same whole latent, share a slice): both count, so the ranks of one
    engine never read each other's slices and a block of another layout (one rank, another
    size) never passes for one of theirs, while engines of one layout share every slice.
    With one rank the fingerprint is what it always was."""
    digest = hashlib.blake2b(digest_size=FINGERPRINT_BYTES, person=b"switchyard-kvfp")
    dtype_name = str(dtype).removeprefix("torch.")
    parts = [model, dtype_name, ",".join(str(int(d)) for d in block_shape)]
    if tp_size > 1:
        if not 0 <= kv_shard < tp_size:
            raise ValueError(f"kv_shard {kv_shard} is not a slice of {tp_size} ranks")
        parts.append(f"tp{tp_size}:{kv_shard}")
    for part in parts:
        encoded = part.encode()
        digest.update(len(encoded).to_bytes(4, "little"))
        digest.update(encoded)
    return digest.digest()
