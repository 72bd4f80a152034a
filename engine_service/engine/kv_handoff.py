"""Prefill/decode disaggregation inside the engine: a prompt's KV blocks leave a prefill
engine and enter a decode engine, which then generates as if it had computed them.

::

    prefill engine                                       decode engine
    add_request(kv_export=KVExport(skip))                add_request(import_kv=True)
      │ chunked prefill, step by step                      │ schedule(): reserve the prompt's
      │ after each step: the prompt's newly                │ blocks (own prefix-cache hits
      │ finished blocks ──▶ KVChunk ──(service: gRPC)──▶   │ first) ──▶ KVReserved(num_held)
      │                                                    │ receive_kv(): copy chunks into
      │ first token sampled ──▶ PrefillDone ──────────▶    │ the reserved blocks, in order
      └ finished (blocks stay in its prefix cache)         └ finish_import(): accept the first
                                                             token, join the running batch

The prompt's blocks are exported from ``num_skip_blocks`` (those the decode engine holds by
prefix hash) up to the last, partly filled block; a block leaves as soon as the step that
completes it has run, so transfer overlaps the next chunk's compute. One block is one
contiguous run of the pool (``kv_cache[block]``: all layers, K and V), so a chunk is a
gather of whole blocks::

    prompt blocks   [ 0 .. held-1 | held ................................ last ]
    decode side       prefix hit    reserved (fresh), written by receive_kv
    prefill side      not sent      sent chunk by chunk as steps finish them

Nothing here blocks or does I/O: the service moves chunks between engines and calls
:meth:`KVImports.receive` / :meth:`KVImports.finish` / :meth:`KVImports.fail` on the engine
thread. A transfer that fails (or a chunk that does not fit) turns the request into an
ordinary waiting one, which recomputes its prompt; its reserved blocks go back first.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from engine_service.engine.outputs import HandoffStats, TokenLogprob
from engine_service.engine.request import Request

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class KVExport:
    """Prefill side, on ``Request.kv_handoff``: the prompt's KV leaves for a decode engine.
    ``next_block`` is the first prompt block not exported yet."""

    num_skip_blocks: int = 0
    next_block: int = 0
    started_at: float = field(default_factory=time.monotonic)
    bytes_sent: int = 0

    def __post_init__(self) -> None:
        self.next_block = self.num_skip_blocks


@dataclass(slots=True)
class KVImport:
    """Decode side, on ``Request.kv_handoff``: the prompt's KV arrives from a prefill engine.
    ``num_held_blocks`` leading blocks came from this engine's prefix cache; ``next_block``
    is the next prompt block expected."""

    reserved: bool = False
    num_held_blocks: int = 0
    next_block: int = 0


@dataclass(slots=True)
class KVReserved:
    """The decode engine reserved blocks for ``request_id``; it holds the first
    ``num_held_blocks`` prompt blocks itself, so those need not be sent."""

    request_id: str
    num_held_blocks: int


@dataclass(slots=True)
class KVChunk:
    """Prompt blocks ``first_block ..`` of ``request_id``: ``blocks[i]`` is one whole block
    (``kv_cache[block_id]``), on the host."""

    request_id: str
    first_block: int
    blocks: torch.Tensor


@dataclass(slots=True)
class PrefillDone:
    """The prefill engine's last word on ``request_id``: the first sampled token, its
    logprob (when asked for), the request's sampler state after the draw (seeded requests),
    and how long the prefill took from admission."""

    request_id: str
    token_id: int
    logprob: TokenLogprob | None
    generator_state: bytes
    num_cached_tokens: int
    prefill_seconds: float
    num_blocks_sent: int
    bytes_sent: int


HandoffEvent = KVReserved | KVChunk | PrefillDone


def num_prompt_blocks(request: Request, block_size: int) -> int:
    return -(-request.num_prompt_tokens // block_size)


def export_ready_blocks(
    request: Request, kv_cache: torch.Tensor, block_size: int, num_computed: int
) -> KVChunk | None:
    """The prompt blocks of an exporting ``request`` that the first ``num_computed`` tokens
    complete and that have not left yet, copied off the pool; None when there are none. The
    partly filled last block leaves once the whole prompt is computed."""
    export = request.kv_handoff
    assert isinstance(export, KVExport)
    prompt_len = request.num_prompt_tokens
    if num_computed >= prompt_len:
        ready = num_prompt_blocks(request, block_size)
    else:
        ready = num_computed // block_size
    if ready <= export.next_block:
        return None
    first = export.next_block
    ids = torch.tensor(request.block_table[first:ready], device=kv_cache.device)
    blocks = kv_cache.index_select(0, ids).to("cpu")
    export.next_block = ready
    export.bytes_sent += blocks.numel() * blocks.element_size()
    return KVChunk(request.request_id, first, blocks)


class KVImports:
    """The decode side's checks and copies; the engine calls it on its own thread."""

    def __init__(self, kv_cache: torch.Tensor, block_size: int) -> None:
        self._kv_cache = kv_cache
        self._block_size = block_size
        self._block_shape = tuple(kv_cache.shape[1:])
        self.stats = HandoffStats()

    def check_chunk(self, request: Request, first_block: int, blocks: torch.Tensor) -> str:
        """Why ``blocks`` cannot go into ``request``'s reserved blocks at ``first_block``
        ("" when they can): out of order, outside the reserved range, or of another shape
        or dtype than this engine's blocks."""
        state = request.kv_handoff
        assert isinstance(state, KVImport) and state.reserved
        if first_block != state.next_block:
            return f"chunk starts at block {first_block}, expected block {state.next_block}"
        end = first_block + blocks.shape[0]
        if end > num_prompt_blocks(request, self._block_size):
            return f"chunk ends at block {end}, past the prompt's last block"
        if tuple(blocks.shape[1:]) != self._block_shape:
            return f"block shape {tuple(blocks.shape[1:])}, this engine's is {self._block_shape}"
        if blocks.dtype != self._kv_cache.dtype:
            return f"dtype {blocks.dtype}, this engine's KV is {self._kv_cache.dtype}"
        return ""

    def write(self, request: Request, first_block: int, blocks: torch.Tensor) -> None:
        """Copy checked blocks into the request's reserved blocks."""
        state = request.kv_handoff
        assert isinstance(state, KVImport)
        ids = request.block_table[first_block : first_block + blocks.shape[0]]
        index = torch.tensor(ids, device=self._kv_cache.device)
        self._kv_cache.index_copy_(0, index, blocks.to(self._kv_cache.device, non_blocking=True))
        state.next_block = first_block + blocks.shape[0]
        self.stats.import_bytes += blocks.numel() * blocks.element_size()

    def missing(self, request: Request) -> int:
        """Prompt blocks not received yet."""
        state = request.kv_handoff
        assert isinstance(state, KVImport)
        return num_prompt_blocks(request, self._block_size) - state.next_block
