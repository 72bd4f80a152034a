"""The replica's Prometheus metrics, under vLLM's names so that dashboards built for vLLM
read the same: the engine's load snapshot, exported at scrape time, and per-request latency
histograms observed by the servicer. Switchyard's own figures use the ``switchyard:`` prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine_service.engine import EngineStats
from engine_service.lora_service import lora_metrics

# vLLM's buckets, so that dashboards built for vLLM read the same.
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class _StatsCollector(Collector):
    """Exports the engine's load snapshot at scrape time under vLLM's gauge/counter names."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self._model_name = model_name
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        labels = [self._model_name]
        gauges = [
            ("vllm:num_requests_running", "Requests in the running batch.", stats.num_running),
            ("vllm:num_requests_waiting", "Requests waiting to run.", stats.num_waiting),
            (
                "vllm:kv_cache_usage_perc",
                "Fraction of KV-cache blocks in use (0..1).",
                stats.kv_usage,
            ),
        ]
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric(labels, value)
            yield gauge
        # prometheus_client appends _total: vllm:prompt_tokens_total etc., as vLLM exports.
        counters = [
            (
                "vllm:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                stats.prefix_cache_queries,
            ),
            (
                "vllm:prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                stats.prefix_cache_hits,
            ),
            ("vllm:num_preemptions", "Preemptions of running requests.", stats.num_preemptions),
            (
                "switchyard:kv_offloaded_blocks",
                "KV blocks copied from the device pool to the host tier.",
                stats.offloaded_blocks,
            ),
            (
                "switchyard:kv_recomputed_tokens",
                "Tokens admitted sequences computed instead of reusing from any KV tier.",
                stats.recomputed_tokens,
            ),
            (
                "switchyard:kv_remote_put_blocks",
                "KV blocks the KV service accepted from this replica.",
                stats.remote_put_blocks,
            ),
            (
                "switchyard:kv_remote_errors",
                "Failed calls to the KV service (served as misses).",
                stats.remote_errors,
            ),
            ("vllm:prompt_tokens", "Prompt tokens processed.", stats.prompt_tokens_total),
            ("vllm:generation_tokens", "Tokens generated.", stats.generation_tokens_total),
            (
                "switchyard:jump_forward_tokens",
                "Output tokens a grammar forced, appended by jump-forward without sampling.",
                stats.jump_forward_tokens,
            ),
            (
                "vllm:spec_decode_num_drafts",
                "Speculative verification rounds (one per sequence per step).",
                stats.spec_num_drafts,
            ),
            (
                "vllm:spec_decode_num_draft_tokens",
                "Draft tokens proposed for verification.",
                stats.spec_num_draft_tokens,
            ),
            (
                "vllm:spec_decode_num_accepted_tokens",
                "Draft tokens the target model accepted.",
                stats.spec_num_accepted_tokens,
            ),
            (
                "vllm:mm_cache_queries",
                "Images looked up in the encoder-output cache (once per request and image).",
                stats.mm_cache_queries,
            ),
            (
                "vllm:mm_cache_hits",
                "Images whose encoder output was found in the cache.",
                stats.mm_cache_hits,
            ),
            (
                "switchyard:mm_encoder_images",
                "Images the vision encoder ran on.",
                stats.mm_images_encoded,
            ),
            (
                "switchyard:mm_encoder_batches",
                "Batched vision-encoder calls (one per engine step that encoded images).",
                stats.mm_encoder_runs,
            ),
        ]
        for name, doc, value in counters:
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric(labels, value)
            yield counter
        per_position = CounterMetricFamily(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens by their position in the draft.",
            labels=["model_name", "position"],
        )
        for position, accepted in enumerate(stats.spec_accepted_per_position):
            per_position.add_metric([*labels, str(position)], accepted)
        yield per_position
        yield from _tier_metrics(labels, stats)
        yield from _handoff_metrics(labels, stats)
        yield from lora_metrics(self._model_name, stats)


def _handoff_metrics(labels: list[str], stats: EngineStats) -> Iterator[Metric]:
    """Disaggregation figures of the engine core: blocks and bytes handed off each way."""
    waiting = GaugeMetricFamily(
        "switchyard:num_requests_awaiting_kv",
        "Decode requests holding reserved blocks while their prompt's KV arrives.",
        labels=["model_name"],
    )
    waiting.add_metric(labels, stats.num_awaiting_kv)
    yield waiting
    handoff = stats.handoff
    for name, doc, sent, received in (
        (
            "switchyard:kv_handoff_bytes",
            "KV bytes handed off: sent (prefill engine) or received (decode engine).",
            handoff.export_bytes,
            handoff.import_bytes,
        ),
        (
            "switchyard:kv_handoffs",
            "KV hand-offs completed: sent (prefill engine) or received (decode engine).",
            handoff.exports_done,
            handoff.imports_done,
        ),
    ):
        counter = CounterMetricFamily(name, doc, labels=["model_name", "direction"])
        counter.add_metric([*labels, "sent"], sent)
        counter.add_metric([*labels, "received"], received)
        yield counter
    skipped = CounterMetricFamily(
        "switchyard:kv_handoff_skipped_blocks",
        "Prompt blocks a decode engine held by prefix hash and was not sent.",
        labels=["model_name"],
    )
    skipped.add_metric(labels, handoff.skipped_blocks)
    yield skipped


def _tier_metrics(labels: list[str], stats: EngineStats) -> Iterator[Metric]:
    """Prefix hits and restores per KV tier; remote hits are the prompt tokens this replica
    skipped because another one (or an earlier life of this one) computed them."""
    hits = CounterMetricFamily(
        "switchyard:kv_hit_tokens",
        "Prompt tokens served from a KV tier instead of computed.",
        labels=["model_name", "tier"],
    )
    for tier, value in (
        ("device", stats.prefix_cache_hits),
        ("host", stats.host_hit_tokens),
        ("remote", stats.remote_hit_tokens),
    ):
        hits.add_metric([*labels, tier], value)
    yield hits
    restored = CounterMetricFamily(
        "switchyard:kv_restored_blocks",
        "KV blocks copied back into the device pool from a lower tier.",
        labels=["model_name", "tier"],
    )
    restored.add_metric([*labels, "host"], stats.restored_blocks_host)
    restored.add_metric([*labels, "remote"], stats.restored_blocks_remote)
    yield restored
    gauges = [
        ("switchyard:kv_host_blocks", "KV blocks in the host tier.", stats.host_blocks),
        (
            "switchyard:kv_host_capacity_blocks",
            "KV blocks the host tier can hold.",
            stats.host_capacity_blocks,
        ),
        (
            "switchyard:kv_remote_available",
            "1 while the KV service answers (0 when it does not, or none is configured).",
            int(stats.remote_available),
        ),
    ]
    for name, doc, value in gauges:
        gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
        gauge.add_metric(labels, value)
        yield gauge


class EngineMetrics:
    """The replica's Prometheus registry: the engine's snapshot plus per-request latencies."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(model_name, stats))
        histograms = {
            "ttft": ("vllm:time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS),
            "itl": (
                "vllm:inter_token_latency_seconds",
                "Time between output tokens.",
                _ITL_BUCKETS,
            ),
            "tpot": (
                "vllm:time_per_output_token_seconds",
                "Time per output token (same as inter-token latency).",
                _ITL_BUCKETS,
            ),
            "e2e": (
                "vllm:e2e_request_latency_seconds",
                "End-to-end request latency.",
                _E2E_BUCKETS,
            ),
        }
        built = {
            key: Histogram(
                name, doc, ["model_name"], buckets=buckets, registry=self.registry
            ).labels(model_name)
            for key, (name, doc, buckets) in histograms.items()
        }
        self.time_to_first_token = built["ttft"]
        self.inter_token_latency = built["itl"]
        self.time_per_output_token = built["tpot"]
        self.e2e_request_latency = built["e2e"]
        self._success = Counter(
            "vllm:request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._refused = Counter(
            "switchyard:requests_refused",
            "Requests answered RESOURCE_EXHAUSTED because the waiting queue was full.",
            ["model_name"],
            registry=self.registry,
        ).labels(model_name)
        self.queue_depth = Gauge(
            "switchyard:num_requests_queued",
            "Requests accepted that wait for a place in the running batch.",
            ["model_name"],
            registry=self.registry,
        ).labels(model_name)
        self.max_queued_requests = Gauge(
            "switchyard:max_queued_requests",
            "The bound on queued requests beyond which the replica refuses (0: none).",
            ["model_name"],
            registry=self.registry,
        ).labels(model_name)
        self._model_name = model_name
        # Disaggregation (decode side, per hand-off), after vLLM's KV-connector figures.
        handoff = {
            "seconds": (
                "switchyard:kv_transfer_seconds",
                "Time a KV hand-off added to the prefill engine's own prefill time.",
                _TTFT_BUCKETS,
            ),
            "prefill": (
                "switchyard:kv_transfer_prefill_seconds",
                "Prefill time the prefill engine reported for a hand-off.",
                _TTFT_BUCKETS,
            ),
            "ratio": (
                "switchyard:kv_transfer_over_prefill",
                "Hand-off time over prefill time.",
                (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
            ),
            "bytes": (
                "switchyard:kv_transfer_bytes",
                "KV bytes received in one hand-off.",
                tuple(float(1 << k) for k in range(10, 34, 2)),
            ),
        }
        made = {
            key: Histogram(name, doc, ["model_name"], buckets=b, registry=self.registry).labels(
                model_name
            )
            for key, (name, doc, b) in handoff.items()
        }
        self.kv_transfer_seconds = made["seconds"]
        self.kv_transfer_prefill_seconds = made["prefill"]
        self.kv_transfer_over_prefill = made["ratio"]
        self.kv_transfer_bytes = made["bytes"]
        self._transfers = Counter(
            "switchyard:kv_transfers",
            "Decode-side KV hand-offs by outcome: done, or recomputed (failed, timed out, "
            "refused).",
            ["model_name", "outcome"],
            registry=self.registry,
        )
        self.role = Gauge(
            "switchyard:engine_role",
            "1 for the role this engine serves (prefill, decode or both).",
            ["model_name", "role"],
            registry=self.registry,
        )

    def handoff_finished(
        self, ok: bool, num_bytes: int, handoff_s: float, prefill_s: float
    ) -> None:
        """One decode-side hand-off: done (its figures observed) or recomputed."""
        self._transfers.labels(self._model_name, "done" if ok else "recomputed").inc()
        if not ok:
            return
        self.kv_transfer_bytes.observe(num_bytes)
        self.kv_transfer_seconds.observe(handoff_s)
        self.kv_transfer_prefill_seconds.observe(prefill_s)
        if prefill_s > 0:
            self.kv_transfer_over_prefill.observe(handoff_s / prefill_s)

    def request_refused(self) -> None:
        self._refused.inc()

    def observe_gap(self, gap_s: float, num_tokens: int) -> None:
        """Tokens that arrived ``gap_s`` after the sample's previous ones."""
        per_token = gap_s / num_tokens
        for _ in range(num_tokens):
            self.inter_token_latency.observe(per_token)
            self.time_per_output_token.observe(per_token)

    def request_finished(self, finish_reason: str) -> None:
        self._success.labels(self._model_name, finish_reason).inc()
