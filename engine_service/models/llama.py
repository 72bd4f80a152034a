"""Llama 1, 2, 3 and 3.1 (``llama3`` rope scaling): pre-norm decoder layers of grouped-query
attention and a gated SiLU MLP; optional biases as ``attention_bias`` / ``mlp_bias`` say."""

from __future__ import annotations

from engine_service.models.dense import DenseCausalLM


class LlamaForCausalLM(DenseCausalLM):
    architecture = "LlamaForCausalLM"
