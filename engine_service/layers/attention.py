"""Self-attention over the paged KV cache: projections, optional q/k norm, rotary, backend.

The module owns the maths around attention; the attention itself (writing this step's K/V
and reading the context through block tables) is the backend's, under the contract of
:mod:`engine_service.layers.paged_attention`. With tensor parallelism each rank runs its
share of the heads; ``o_proj`` sums the ranks' results.
"""

from __future__ import annotations

import torch
from torch import nn

from engine_service.layers.linear import QKVParallelLinear, RowParallelLinear
from engine_service.layers.norms import RMSNorm
from engine_service.layers.paged_attention import AttentionBackend, AttentionMetadata
from engine_service.layers.parallel import SINGLE, TensorParallel
from engine_service.layers.rotary import apply_rotary


class Attention(nn.Module):
    """Grouped-query attention of one decoder layer.

    ``qk_norm_eps`` set: an RMSNorm per head on queries and keys before rotary (Qwen3).
    ``window`` set: this layer attends to the ``window`` most recent keys only.
    ``sinks`` set: a learned logit per query head joins every softmax as one more key with no
    value (gpt-oss), so a head can attend to nothing; the backend must support it.
    ``input_size`` set: the projections read rows that wide instead of ``hidden_size``
    (an EAGLE-3 head attends over its embedding and hidden state side by side).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer: int,
        backend: AttentionBackend,
        *,
        window: int | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm_eps: float | None = None,
        sinks: bool = False,
        tp: TensorParallel = SINGLE,
        input_size: int | None = None,
    ) -> None:
        super().__init__()
        if sinks and not backend.supports_sinks:
            raise ValueError(
                f"the {backend.name} attention backend does not support attention sinks"
            )
        self.layer = layer
        self.backend = backend
        self.window = window
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.qkv_proj = QKVParallelLinear(
            input_size or hidden_size, head_dim, num_heads, num_kv_heads, qkv_bias, tp
        )
        self.num_heads = self.qkv_proj.num_heads  # rank-local
        self.num_kv_heads = self.qkv_proj.num_kv_heads  # rank-local
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, o_bias, tp)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.sinks: nn.Parameter | None = None
        if sinks:
            self.sinks = nn.Parameter(torch.empty(self.num_heads), requires_grad=False)
            self.sinks.weight_loader = self._load_sinks
            self._first_head = tp.rank * self.num_heads

    def _load_sinks(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """This rank's query heads' sink logits, from the checkpoint's ``[num_heads]``."""
        if shard_id is not None or loaded.dim() != 1:
            raise ValueError(
                f"attention sinks must be one logit per head, got {tuple(loaded.shape)}"
            )
        param.data.copy_(loaded.narrow(0, self._first_head, self.num_heads))

    def forward(
        self,
        hidden: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """``hidden [T, hidden]`` to ``[T, hidden]``; ``cos_sin`` from the model's rotary."""
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos_sin
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.sinks is None:
            out = self.backend.forward(q, k, v, kv_cache, self.layer, meta, self.scale, self.window)
        else:
            out = self.backend.forward(
                q, k, v, kv_cache, self.layer, meta, self.scale, self.window, sinks=self.sinks
            )
        return self.o_proj(out.reshape(num_tokens, self.q_size))
