"""Per-request state inside the engine: tokens, progress, blocks, and sampling state."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from engine_service.engine.outputs import TokenLogprob
from engine_service.engine.sampling_params import SamplingParams
from engine_service.engine.structured import GrammarMatcher

_arrival_counter = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    """One sequence being generated: one of a request's ``n`` samples.

    The sequence is ``all_token_ids`` (prompt then outputs). ``num_computed_tokens`` of them
    have their KV in the blocks of ``block_table``; a step computes the next ones. After
    sampling, ``all_token_ids`` is one longer than what is computed: the newest token's KV is
    written by the next step (after a jump-forward, several tokens wait for their KV).
    ``grammar`` is the sample's own structured-output matcher, if it is constrained.

    Only :meth:`Scheduler.update <engine_service.engine.scheduler.Scheduler.update>` (and
    the scheduler's admission and preemption) change a request's progress; the KV manager
    owns ``block_table`` and the block hashes. With overlapped scheduling one sampled token
    may be in flight: ``num_pending_tokens`` counts it until the step's results come back,
    and ``pending_row`` is its row in that step's sampled-token tensor.

    Fields marked *room* are not used by the core yet; later capabilities fill them
    (KV transfer between engines).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    index: int = 0
    priority: int = 0
    arrival_seq: int = field(default_factory=lambda: next(_arrival_counter))
    all_token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    # How many leading blocks of block_table are offered to the prefix cache already.
    num_committed_blocks: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_token_id: int | None = None
    generator: torch.Generator | None = None
    # Samples 1..n-1 of an n > 1 request, forked from this one when its prompt is done.
    pending_forks: list[Request] = field(default_factory=list)
    # Tokens (and their logprobs) appended since the engine last reported this sample.
    unreported_token_ids: list[int] = field(default_factory=list)
    unreported_logprobs: list[TokenLogprob] = field(default_factory=list)
    grammar: GrammarMatcher | None = None
    num_pending_tokens: int = 0
    pending_row: int = -1
    # How often the sequence was preempted: steps in flight across a preemption are stale.
    num_preemptions: int = 0
    # The LoRA adapter's content key; the cache salt of the block hashes; where offloaded
    # prefix blocks are being fetched from. (Draft tokens live on the step:
    # ScheduledSequence.draft_token_ids.)
    adapter_id: str | None = None
    # The device LoRA slot + 1 the request's tokens use (0: the base model); set by the
    # engine when it admits the request, copied into every ScheduledSequence.
    adapter_slot: int = 0
    # The prompt's images (engine/multimodal.py ImageInput), in prompt order; how many of
    # them the encoder cache was asked for; with M-RoPE (Qwen2-VL), the prompt's 3-D rotary
    # positions [3, num_prompt_tokens] and the shift of every position after the prompt.
    mm_inputs: list[Any] = field(default_factory=list)
    num_mm_looked_up: int = 0
    mrope_positions: Any = None
    mrope_delta: int = 0
    cache_salt: str | None = None
    kv_transfer: Any = None
    # Prefill/decode disaggregation: a KVExport (prefill engine) or KVImport (decode engine),
    # see engine_service.engine.kv_handoff; None for a request computed here from start to end.
    kv_handoff: Any = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(self.params.seed + self.index)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        """Known tokens plus the one a step in flight is sampling."""
        return len(self.all_token_ids) + self.num_pending_tokens

    @property
    def needs_host_tokens(self) -> bool:
        """Whether sampling the next token needs the newest token on the host first
        (grammar matchers and penalties read it), so no step may run ahead of it."""
        return self.grammar is not None or self.params.needs_penalties

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: lower priority value first, then arrival (FCFS)."""
        return (self.priority, self.arrival_seq)

    def append_token(self, token_id: int, logprob: TokenLogprob | None) -> None:
        self.all_token_ids.append(token_id)
        self.unreported_token_ids.append(token_id)
        if logprob is not None:
            self.unreported_logprobs.append(logprob)

    def replace_newest_token(self, token_ids: list[int]) -> None:
        """Put ``token_ids`` in place of the newest token (jump-forward). That token must be
        unreported, without KV yet, and without a logprob."""
        assert self.num_computed_tokens < self.num_tokens and self.unreported_token_ids
        self.all_token_ids[-1:] = token_ids
        self.unreported_token_ids[-1:] = token_ids

    def check_stop(self) -> bool:
        """Mark the sample finished if its newest token ends it; return whether it did."""
        params = self.params
        num_out = self.num_output_tokens
        last = self.all_token_ids[-1]
        is_stop = last in params.stop_token_ids or (
            not params.ignore_eos and last in self.eos_token_ids
        )
        if is_stop and num_out >= params.min_tokens:
            self.finish("stop", stop_token_id=last)
            return True
        if num_out >= params.max_tokens:
            self.finish("length")
            return True
        return False

    def finish(self, reason: str, stop_token_id: int | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_token_id = stop_token_id

    def fork(self, index: int) -> Request:
        """A new sample of the same request that shares this one's prompt."""
        child = Request(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            params=self.params,
            eos_token_ids=self.eos_token_ids,
            index=index,
            priority=self.priority,
            arrival_seq=self.arrival_seq,
            adapter_id=self.adapter_id,
            adapter_slot=self.adapter_slot,
            cache_salt=self.cache_salt,
            grammar=self.grammar.copy() if self.grammar is not None else None,
            mm_inputs=self.mm_inputs,
            mrope_positions=self.mrope_positions,
            mrope_delta=self.mrope_delta,
        )
        return child
