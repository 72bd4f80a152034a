"""What the engine hands back: per-step token deltas and engine-wide statistics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprob:
    """The sampled token's logprob and, if asked for, the top alternatives at that step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutput:
    """New tokens of one sample (``index`` among the request's ``n``) since the last step.

    ``finish_reason`` is ``"stop"`` (EOS or a stop token, or the end of the sample's grammar:
    then ``stop_token_id`` may be ``None``), ``"length"`` (max_tokens) or ``"abort"``;
    ``None`` while the sample is still running.
    """

    request_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None
    stop_token_id: int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class LoRAAdapterStats:
    """One registered adapter: where it came from, its content digest, whether it is in a
    device slot now, and how many requests asked for it."""

    name: str
    path: str
    fingerprint: str
    resident: bool
    requests_total: int


@dataclass(frozen=True, slots=True)
class LoRAStats:
    """The engine's adapters, and which of them unfinished requests use (vLLM's
    ``lora_requests_info``: running ones are admitted, waiting ones are not yet)."""

    max_loras: int
    adapters: tuple[LoRAAdapterStats, ...]
    running: tuple[str, ...]
    waiting: tuple[str, ...]
    loads_total: int
    load_seconds_total: float


@dataclass(slots=True)
class HandoffStats:
    """KV hand-offs (disaggregation) since start: sent by a prefill engine, received by a
    decode engine, decode-side transfers that failed (the prompt was recomputed instead),
    and prompt blocks a decode engine held itself and was not sent."""

    exports_done: int = 0
    export_bytes: int = 0
    imports_done: int = 0
    import_bytes: int = 0
    import_failures: int = 0
    skipped_blocks: int = 0


@dataclass(slots=True)
class EngineStats:
    """A snapshot of load and cache figures, cheap enough to take on every heartbeat."""

    num_running: int
    num_waiting: int
    kv_usage: float
    num_blocks_total: int
    num_blocks_free: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    steps_total: int
    # Output tokens a grammar forced and jump-forward appended without sampling them.
    jump_forward_tokens: int = 0
    # Offload tiers: prompt tokens restored from the host tier and the remote store instead
    # of computed, tokens admitted sequences did compute, and block movements.
    host_hit_tokens: int = 0
    remote_hit_tokens: int = 0
    recomputed_tokens: int = 0
    offloaded_blocks: int = 0
    restored_blocks_host: int = 0
    restored_blocks_remote: int = 0
    remote_put_blocks: int = 0
    remote_errors: int = 0
    host_blocks: int = 0
    host_capacity_blocks: int = 0
    remote_available: bool = False
    # Speculative decoding: verification rounds, tokens proposed, tokens the target kept,
    # and how many were kept at each draft position (vLLM's spec_decode counters).
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_position: tuple[int, ...] = ()
    # Vision-language models: encoder-cache lookups (once per request and image) and hits,
    # images the encoder ran on, its batched calls, and what the cache holds.
    mm_cache_queries: int = 0
    mm_cache_hits: int = 0
    mm_images_encoded: int = 0
    mm_encoder_runs: int = 0
    mm_cache_entries: int = 0
    mm_cache_bytes: int = 0
    # None when LoRA is off.
    lora: LoRAStats | None = None
    # Disaggregation: requests holding reserved blocks while their prompt's KV arrives, and
    # the hand-offs this engine sent (prefill) and received (decode).
    num_awaiting_kv: int = 0
    handoff: HandoffStats = field(default_factory=HandoffStats)

    @property
    def spec_mean_acceptance_length(self) -> float:
        """Tokens committed per verification round: accepted drafts plus the one after."""
        if not self.spec_num_drafts:
            return 0.0
        return 1.0 + self.spec_num_accepted_tokens / self.spec_num_drafts

    @property
    def prefix_hit_rate(self) -> float:
        if self.prefix_cache_queries == 0:
            return 0.0
        return self.prefix_cache_hits / self.prefix_cache_queries
