"""The attention contract between models and the engine: one ragged batch, swappable backends.

A step is a flat batch of ``T`` query tokens from ``B`` sequences laid end to end. Sequence
``i`` owns query rows ``query_start_loc[i] : query_start_loc[i + 1]`` (``q_i`` of them) and,
after this step, ``seq_lens[i]`` tokens of context: ``c_i = seq_lens[i] - q_i`` already in
the cache, then its ``q_i`` new ones. The KV cache is one tensor per engine, block-major, so a
block's keys and values for every layer are one contiguous run (what offload and hand-off
copy)::

    kv_cache[num_blocks, num_layers, 2 (k, v), block_size, num_kv_heads, head_dim]

    sequence i      [ cached context: c_i tokens        | q_i new tokens (this step) ]
    cache index      0 ...                        c_i-1   c_i ...          seq_lens[i]-1
    through          block_tables[i, idx // block_size], offset idx % block_size

Token ``t`` writes its K/V to slot ``slot_mapping[t]`` (``block_id * block_size + offset``).
Padding rows of a captured graph write into a scratch block that the pool never hands out,
and padding sequences have no query rows and a context of zero.

Masking. Query ``j`` of sequence ``i`` (cache index ``c_i + j``, rotary position
``positions[t]``) sees every cached key ``< c_i`` and, among the step's own keys, key ``k``
when ``k <= j`` (causal) or, when ``custom_mask`` is given, when that sequence's mask says so.
A sliding-window layer further hides cache index ``idx`` when ``idx <= positions[t] - window``.

Sinks. A layer may pass ``sinks`` (``[q_heads]``, one logit per query head, gpt-oss): each
head's softmax then runs over its visible keys plus one extra logit ``sinks[h]`` whose value is
zero, i.e. the output is scaled by ``sum(exp(s)) / (sum(exp(s)) + exp(sinks[h]))``.

``custom_mask`` (token trees for speculative verification) is a flat bool tensor holding, for
every sequence in order, its ``q_i x q_i`` matrix row-major (row: query, column: key), starting
at ``custom_mask_offsets[i]``; plain sequences carry their causal lower triangle.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """The backend-neutral description of one step's attention, built once per step.

    Integer tensors live on the model's device: ``query_start_loc`` ``[B+1]`` int32,
    ``seq_lens`` ``[B]`` int32, ``positions`` ``[T]`` int64, ``slot_mapping`` ``[T]`` int64,
    ``block_tables`` ``[B, max_blocks]`` int32 (unused columns may hold anything).
    ``*_host`` twins are CPU copies of the same values for backends that plan on the host.
    ``backend_data`` is whatever the backend's :meth:`AttentionBackend.prepare` attaches.
    """

    num_tokens: int
    num_seqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc_host: torch.Tensor
    seq_lens_host: torch.Tensor
    custom_mask: torch.Tensor | None = None
    custom_mask_offsets: torch.Tensor | None = None
    backend_data: Any = None


class AttentionBackend(abc.ABC):
    """Computes attention for one layer of a ragged batch and stores the new K/V.

    Contract: ``prepare`` is called once per step before the forward pass; ``forward`` first
    writes ``k``/``v`` (``[T, kv_heads, head_dim]``) into the layer's slots, then returns
    ``[T, q_heads, head_dim]`` under the masking rules of this module's docstring.

    Capability flags say what the engine may ask of a backend: ``supports_custom_mask``
    (token trees), ``supports_cuda_graphs`` (``forward`` of decode-only steps captures into a
    CUDA graph once the metadata's tensors are static buffers, see
    :meth:`prepare_for_capture`), ``supports_mixed_graphs`` (so do steps mixing decodes with
    extends, given ``max_query_len`` as an upper bound), ``supports_sinks`` (``forward`` takes
    per-head ``sinks`` logits as a keyword).
    """

    name: ClassVar[str]
    supports_custom_mask: ClassVar[bool] = False
    supports_cuda_graphs: ClassVar[bool] = False
    supports_mixed_graphs: ClassVar[bool] = False
    supports_sinks: ClassVar[bool] = False

    def prepare(self, meta: AttentionMetadata, block_size: int) -> None:
        """Attach backend-specific extras to ``meta.backend_data`` (default: none)."""
        meta.backend_data = None

    def warm_up(
        self,
        kv_cache: torch.Tensor,
        num_heads: int,
        windows: set[int | None],
        max_tokens: int,
        sinks: bool = False,
        custom_masks: bool = False,
    ) -> None:
        """Compile or tune whatever later steps would otherwise build on first use (default:
        nothing), once at start, before any graph is captured, for a model of ``num_heads``
        query heads whose layers use ``windows`` and (``sinks``) pass sink logits, in steps
        that may carry ``custom_masks`` (token trees)."""
        return None

    def prepare_for_capture(self, meta: AttentionMetadata, block_size: int) -> None:
        """Like :meth:`prepare` for a graph being captured: whatever it attaches must be
        device buffers that :meth:`prepare_for_replay` refreshes in place."""
        self.prepare(meta, block_size)

    def prepare_for_replay(
        self, captured: AttentionMetadata, live: AttentionMetadata, block_size: int
    ) -> None:
        """Refresh the captured graph's backend buffers from ``live`` (default: none)."""
        return None

    @abc.abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        layer: int,
        meta: AttentionMetadata,
        scale: float,
        window: int | None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor: ...
