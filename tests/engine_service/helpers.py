"""Shared pieces for the engine-core tests: a tiny checkpoint, hand-made requests, and
checks on the KV block pool."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from engine_service.engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams
from engine_service.engine.kv_cache import KVCacheManager
from engine_service.engine.request import Request

VOCAB = 320
EOS = 2


def make_llama_checkpoint(
    path: Path, seed: int = 1234, num_hidden_layers: int = 2
) -> transformers.LlamaForCausalLM:
    """A random Llama (two layers by default) saved to ``path`` in fp32.

    ``initializer_range`` is large enough that greedy decoding does not collapse onto one
    token, so stop tokens, penalties and sampling have something to act on.
    """
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        eos_token_id=EOS,
        bos_token_id=1,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def make_engine(path: Path, **settings) -> LLMEngine:
    """An fp32 CPU engine with a small explicit KV pool (the CPU default is 1 GiB)."""
    config = {"num_kv_blocks": 64, "block_size": 4, **settings}
    return LLMEngine(EngineConfig(model=str(path), dtype="float32", **config))


def make_request(request_id: str, prompt: list[int], **fields) -> Request:
    return Request(request_id, list(prompt), SamplingParams(), frozenset({EOS}), **fields)


def assert_pool_entirely_free(kv: KVCacheManager) -> None:
    pool = kv.pool
    assert pool.num_free == pool.num_blocks
    assert all(count == 0 for count in pool.ref_counts), pool.ref_counts


def greedy(max_tokens: int, **fields) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **fields)


def run_all(engine: LLMEngine) -> dict[tuple[str, int], list[RequestOutput]]:
    """Step until the engine is idle; every output, keyed by (request id, sample index)."""
    outputs: dict[tuple[str, int], list[RequestOutput]] = {}
    while engine.has_unfinished():
        for output in engine.step():
            outputs.setdefault((output.request_id, output.index), []).append(output)
    return outputs


def tokens_of(outputs: list[RequestOutput]) -> list[int]:
    return [t for output in outputs for t in output.new_token_ids]
