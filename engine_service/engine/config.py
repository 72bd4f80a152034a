"""The engine's knobs, one typed object; the service maps its settings onto it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EngineConfig:
    """How an engine loads its model and shares out memory and compute.

    Memory: the KV pool holds ``num_kv_blocks`` blocks of ``block_size`` tokens when that is
    given; otherwise it is sized from ``kv_cache_memory_bytes``; otherwise, on a GPU, from
    ``gpu_memory_utilization`` of the device memory left after the weights, and on the CPU
    from a 1 GiB default.

    Compute: one step runs at most ``max_num_batched_tokens`` tokens (decodes count one each)
    for at most ``max_num_seqs`` sequences; a prefill longer than the remaining budget runs in
    chunks, and ``long_prefill_token_threshold`` (0: off) caps one request's chunk so that
    several prompts can share a step.
    """

    model: str
    dtype: str = "auto"
    device: str = "cpu"
    revision: str | None = None
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    long_prefill_token_threshold: int = 0
    enable_chunked_prefill: bool = True
    attention_backend: str = "sdpa"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_batched_tokens must be positive")
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError("num_kv_blocks must be at least 2")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
