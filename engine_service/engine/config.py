"""The engine's knobs, one typed object; the service maps its settings onto it."""

from __future__ import annotations

from dataclasses import dataclass

from engine_service.engine.spec.config import SpeculativeConfig


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

    Kernels: ``attention_backend`` ``auto`` takes the Triton backend (paged extend kernel) on
    CUDA and the SDPA reference elsewhere. On CUDA with Triton, steps of up to
    ``cuda_graph_max_batch`` tokens, decodes alone or mixed with prefill chunks, replay CUDA
    graphs captured at start.

    Offload: with ``enable_kv_offload``, cached blocks evicted from the device pool move to a
    host-memory tier of ``kv_offload_host_bytes`` (LRU), and through it to the remote KV
    store the engine is given, if any; with ``kv_write_through`` every block also goes
    there once computed, so other replicas can reuse it. After a failed call to the store,
    the engine serves without it for ``kv_remote_retry_s``. ``enable_kv_events`` records which
    blocks the engine holds, for prefix-aware routing. ``kv_offload_host_bytes`` is per rank
    on a parallel engine, as the KV pool's budgets are: each rank offloads and restores its
    own share of every block (its heads), as rank 0 decides, and stores it in the remote
    store under a fingerprint of its own; each data-parallel rank's pool has its own tiers.

    Scheduling: with ``async_scheduling`` the host schedules and prepares step N+1 while
    the device runs step N (SGLang's overlap scheduler, vLLM's async scheduling); results
    are identical, the outputs of a step arrive one step later.

    Speculation: ``speculative_config`` is vLLM's ``--speculative-config`` JSON (empty: off);
    see :mod:`engine_service.engine.spec`. It turns overlapped scheduling off. With several
    ranks every method works, but ``mtp`` not with ``data_parallel_size`` > 1 (see
    ``SpeculativeConfig.check_parallel``).

    Structured output: ``grammar_backend`` compiles the constraints that name no backend
    (``"llguidance"`` or ``"xgrammar"``); ``enable_jump_forward`` appends the bytes a grammar
    forces in one step instead of sampling them token by token.

    LoRA: with ``enable_lora`` every linear layer of the decoder can carry adapters of rank
    up to ``max_lora_rank``; ``max_loras`` of them sit on the device at once (a batch mixes
    them freely with the base model), ``max_cpu_loras`` (default ``max_loras``) in host
    memory. ``lora_modules`` are (name, PEFT folder or hub id) pairs loaded at start.
    Under tensor parallelism every rank holds its slice of each adapter, as of the weights;
    under data parallelism every rank holds every slot.

    Images (vision-language models): encoder outputs are kept by image content hash, least
    recently used evicted first, up to ``mm_encoder_cache_gb`` GiB (0: off).

    Parallelism (vLLM's meanings, see :mod:`engine_service.engine.parallel`): the model runs
    on ``tensor_parallel_size`` ranks, each holding a slice of every layer's heads, inner
    dimension and vocabulary; with ``enable_expert_parallel`` the MoE layers instead hold
    whole experts, ``1 / (data_parallel_size x tensor_parallel_size)`` of them per rank, and
    exchange tokens all-to-all. ``data_parallel_size`` > 1 is data-parallel attention: each
    of that many data-parallel ranks (``tensor_parallel_size`` ranks each, splitting the
    model among them) runs its own batch in its own KV pool; with expert parallelism the MoE
    layers exchange tokens between them, without it each data-parallel rank holds every
    expert (split over its tensor-parallel ranks). Steps then run without overlapped
    scheduling. This process is rank 0; it schedules every data-parallel rank and starts
    the other ranks itself.
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
    attention_backend: str = "auto"
    enable_cuda_graphs: bool = True
    cuda_graph_max_batch: int = 512
    enable_kv_offload: bool = False
    kv_offload_host_bytes: int = 1 << 30
    kv_write_through: bool = True
    kv_remote_retry_s: float = 2.0
    enable_kv_events: bool = False
    seed: int = 0
    grammar_backend: str = "llguidance"
    enable_jump_forward: bool = True
    async_scheduling: bool = True
    speculative_config: str = ""
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    lora_modules: tuple[tuple[str, str], ...] = ()
    mm_encoder_cache_gb: float = 1.0
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_batched_tokens must be positive")
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError("num_kv_blocks must be at least 2")
        if self.enable_kv_offload and not self.enable_prefix_caching:
            raise ValueError("enable_kv_offload needs enable_prefix_caching")
        if self.kv_offload_host_bytes < 0:
            raise ValueError("kv_offload_host_bytes must not be negative")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.lora_modules and not self.enable_lora:
            raise ValueError("lora_modules need enable_lora")
        if self.mm_encoder_cache_gb < 0:
            raise ValueError("mm_encoder_cache_gb must not be negative")
        self._check_parallel()
        if self.grammar_backend not in ("llguidance", "xgrammar"):
            raise ValueError(
                f"grammar_backend must be llguidance or xgrammar, got {self.grammar_backend!r}"
            )

    @property
    def world_size(self) -> int:
        """Ranks one engine drives: data-parallel times tensor-parallel."""
        return self.data_parallel_size * self.tensor_parallel_size

    def _check_parallel(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")
        if self.data_parallel_size < 1:
            raise ValueError("data_parallel_size must be at least 1")
        if self.world_size == 1:
            return
        if self.speculative_config:
            SpeculativeConfig.parse(self.speculative_config).check_parallel(
                self.tensor_parallel_size, self.data_parallel_size
            )
