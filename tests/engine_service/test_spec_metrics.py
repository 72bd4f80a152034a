"""Speculative decoding's counters reach /metrics under vLLM's names, from a real engine."""

from __future__ import annotations

import json
import re

from prometheus_client import CollectorRegistry, generate_latest

from engine_service.metrics import _StatsCollector
from tests.engine_service.helpers import greedy, make_engine, make_llama_checkpoint


def test_spec_decode_counters_are_exported_with_vllms_names(tmp_path):
    make_llama_checkpoint(tmp_path)
    spec = json.dumps({"model": str(tmp_path), "num_speculative_tokens": 3})
    engine = make_engine(tmp_path, speculative_config=spec)
    engine.generate([[5, 6, 7, 8, 9, 10]], greedy(20, ignore_eos=True))
    stats = engine.stats()
    registry = CollectorRegistry()
    registry.register(_StatsCollector("tiny", engine.stats))
    text = generate_latest(registry).decode()

    def value(name: str, extra: str = "") -> float:
        pattern = rf'^{re.escape(name)}\{{model_name="tiny"{extra}\}} (\S+)$'
        match = re.search(pattern, text, re.M)
        assert match, f"{name} missing"
        return float(match.group(1))

    # The target is its own draft: every draft is accepted.
    assert value("vllm:spec_decode_num_drafts_total") == stats.spec_num_drafts > 0
    drafted = value("vllm:spec_decode_num_draft_tokens_total")
    assert value("vllm:spec_decode_num_accepted_tokens_total") == drafted > 0
    per_position = [
        value("vllm:spec_decode_num_accepted_tokens_per_pos_total", f',position="{p}"')
        for p in range(3)
    ]
    assert sum(per_position) == drafted
    assert stats.spec_mean_acceptance_length > 1
