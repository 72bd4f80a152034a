"""What the engine may rely on in a model class, whatever its family."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from engine_service.layers.paged_attention import AttentionBackend, AttentionMetadata
from engine_service.layers.parallel import TensorParallel
from engine_service.models.config import ModelConfig

# Checkpoint name segment -> (our parameter's name segment, shard id); see models/weights.py.
WeightMapping = dict[str, tuple[str, Any]]


class CausalLM(Protocol):
    """A decoder-only language model over the paged KV cache.

    ``forward`` maps a flat batch (``input_ids [T]``, ``positions [T]``) to final hidden
    states ``[T, hidden]``; ``compute_logits`` projects only the rows that are sampled, so
    prefill chunks never pay for the vocabulary projection. The class declares how to read
    its family's ``config.json`` (``parse_config``) and which checkpoint tensors load into
    which of its parameters (``packed_modules_mapping``). The config's ``kv_block_shape``
    says what a KV block holds. A class may set ``computes_own_attention = True`` when it
    reads its own cache layout (DeepSeek's latent attention) instead of calling the
    attention backend: the engine then neither warms the backend up nor captures graphs.
    """

    config: ModelConfig
    packed_modules_mapping: ClassVar[WeightMapping]

    @classmethod
    def parse_config(cls, raw: dict[str, Any]) -> ModelConfig: ...

    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, tp: TensorParallel = ...
    ) -> None: ...

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...
