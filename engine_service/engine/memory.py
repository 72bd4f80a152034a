"""How many KV blocks an engine's pool gets, from its budgets and the device's memory."""

from __future__ import annotations

import math

import torch

from engine_service.engine.config import EngineConfig
from engine_service.engine.spec.config import SpeculativeConfig
from engine_service.layers.parallel import kv_heads_per_rank
from engine_service.models.config import ModelConfig

_CPU_KV_BUDGET = 1 << 30


def rank_kv_block_shape(config: ModelConfig, block_size: int, tp_size: int = 1) -> tuple[int, ...]:
    """One rank's block shape: the model's (``kv_block_shape``) with the key/value heads that
    rank holds (all of a single latent head, replicated, for multi-head latent attention)."""
    shape = config.kv_block_shape(block_size)
    if tp_size == 1:
        return shape
    return (*shape[:3], kv_heads_per_rank(shape[3], tp_size), *shape[4:])


def kv_block_bytes(
    config: ModelConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1
) -> int:
    """Bytes of one block on one rank: what every layer caches for ``block_size`` tokens
    (keys and values, or a latent for multi-head latent attention), as the model's block
    shape says, for the heads that rank holds."""
    element = torch.empty((), dtype=dtype).element_size()
    return math.prod(rank_kv_block_shape(config, block_size, tp_size)) * element


def num_kv_blocks(
    config: EngineConfig, model: ModelConfig, dtype: torch.dtype, device: torch.device
) -> int:
    """``num_kv_blocks`` when given; else ``kv_cache_memory_bytes`` worth; else, on a GPU,
    what is left of ``gpu_memory_utilization`` after the weights and a step's reserve; on
    the CPU, 1 GiB worth. The budget covers the ``mtp`` proposer's cache too (one more
    layer per block id), and an EAGLE head's: one layer like the target's, plus the
    target features it reads (the hidden size per token, three times that for EAGLE-3).
    Under tensor parallelism the budgets are per rank (each rank caches its own heads, and
    the EAGLE head's layer and features whole) and this is one rank's figure; the ranks take
    the smallest."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = kv_block_bytes(model, config.block_size, dtype, config.tensor_parallel_size)
    spec = config.speculative_config
    method = SpeculativeConfig.parse(spec).method if spec else None
    if method == "mtp":
        per_block += per_block // model.num_layers
    if method in ("eagle", "eagle3"):
        # The head's layer is whole on every tensor-parallel rank (its heads not split).
        per_block += kv_block_bytes(model, config.block_size, dtype) // model.num_layers
        element = torch.empty((), dtype=dtype).element_size()
        width = model.hidden_size * (3 if method == "eagle3" else 1)
        per_block += config.block_size * width * element
    if config.kv_cache_memory_bytes is not None:
        budget = config.kv_cache_memory_bytes
    elif device.type == "cuda":
        budget = _gpu_kv_budget(config, model, dtype, device)
    else:
        budget = _CPU_KV_BUDGET
    num_blocks = budget // per_block
    if num_blocks < 2:
        raise ValueError(
            f"the KV memory budget ({budget} bytes) holds fewer than 2 blocks of {per_block} bytes"
        )
    return int(num_blocks)


def _gpu_kv_budget(
    config: EngineConfig, mc: ModelConfig, dtype: torch.dtype, device: torch.device
) -> int:
    """What is left of ``gpu_memory_utilization`` of the device after the weights and
    a reserve for the largest step's activations and logits."""
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_allocated(device)
    element = torch.empty((), dtype=dtype).element_size()
    tp = config.tensor_parallel_size
    activations = (
        config.max_num_batched_tokens
        * (
            4 * mc.hidden_size
            + (3 * mc.intermediate_size + (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim) // tp
        )
        * element
        * 2
    )
    logits = config.max_num_seqs * mc.vocab_size * 4 * 4
    budget = int(total * config.gpu_memory_utilization) - used_by_others
    return budget - torch.cuda.memory_allocated(device) - activations - logits


def allocate_kv_cache(
    num_blocks: int,
    block_size: int,
    model: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    tp_size: int = 1,
) -> torch.Tensor:
    """The pool's tensor (layout in ``layers/paged_attention.py``) for the heads of one
    rank, with one block more than the pool hands out: padding rows of captured CUDA graphs
    write their throw-away K/V there."""
    return torch.zeros(
        (num_blocks + 1, *rank_kv_block_shape(model, block_size, tp_size)),
        dtype=dtype,
        device=device,
    )
