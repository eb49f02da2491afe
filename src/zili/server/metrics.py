"""Prometheus metrics for GET /metrics.

Engine state (running / waiting requests, KV usage, prefix hit rate, token counters) is read
from the AsyncEngine's latest stats snapshot when scraped; latencies are observed by the server
as responses are produced, i.e. as the client sees them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from zili.engine.async_engine import ServingEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _EngineStatsCollector(Collector):
    def __init__(self, engine: ServingEngine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        if stats is None:
            return
        gauges = [
            ("zili_num_requests_running", "Requests in the running batch.", stats.num_running),
            ("zili_num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting),
            ("zili_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0-1).", stats.kv_cache_usage),
            ("zili_prefix_cache_hit_rate", "Fraction of prompt tokens served from the prefix cache (0-1).",
             stats.prefix_cache_hit_rate),
            ("zili_kv_cache_free_blocks", "KV-cache blocks free for new requests.", stats.num_free_blocks),
            ("zili_kv_cache_total_blocks", "KV-cache blocks in the pool.", stats.num_total_blocks),
        ]
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric([self.model_name], float(value))
            yield gauge
        counters = [
            ("zili_prompt_tokens", "Prompt tokens processed (prefilled or read from the prefix cache).",
             stats.prompt_tokens_total),
            ("zili_generation_tokens", "Tokens generated.", stats.generation_tokens_total),
            ("zili_num_preemptions", "Sequences preempted (KV pool full) and recomputed later.",
             getattr(stats, "num_preemptions", 0)),
            # Speculative decoding (zili.engine.spec_decode), named as vLLM's spec_decode_* metrics.
            ("zili_spec_decode_num_drafts", "Verify steps of a sequence that carried draft tokens.",
             getattr(stats, "spec_decode_num_drafts", 0)),
            ("zili_spec_decode_num_draft_tokens", "Draft tokens proposed and verified.",
             getattr(stats, "spec_decode_num_draft_tokens", 0)),
            ("zili_spec_decode_num_accepted_tokens", "Draft tokens accepted.",
             getattr(stats, "spec_decode_num_accepted_tokens", 0)),
            # Jump-forward structured decoding (zili.engine.jump_forward).
            ("zili_jump_forward_num_jumps", "Steps in which a sequence's grammar-forced text was verified as drafts "
             "or appended.", getattr(stats, "jump_forward_num_jumps", 0)),
            ("zili_jump_forward_num_forced_tokens", "Forced tokens that took no step of their own (steps saved): "
             "forced drafts accepted, or forced tokens appended.", getattr(stats, "jump_forward_num_forced_tokens", 0)),
            ("zili_jump_forward_num_forced_draft_tokens", "Forced tokens proposed as drafts and verified (verify mode).",
             getattr(stats, "jump_forward_num_forced_draft_tokens", 0)),
        ]
        for name, doc, value in counters:
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric([self.model_name], float(value))
            yield counter
        rates = [
            ("zili_spec_decode_acceptance_rate", "Accepted / proposed draft tokens since start (0-1).",
             getattr(stats, "spec_decode_acceptance_rate", 0.0)),
            ("zili_spec_decode_mean_accepted_length", "Tokens a verify step yielded on average since start "
             "(1 + accepted drafts per step with drafts; 0 before any).",
             getattr(stats, "spec_decode_mean_accepted_length", 0.0)),
        ]
        for name, doc, value in rates:
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric([self.model_name], float(value))
            yield gauge


class ServerMetrics:
    """One registry per app, so several servers can live in one process (tests)."""

    def __init__(self, engine: ServingEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(engine, model_name))
        self.ttft = Histogram("zili_time_to_first_token_seconds", "Time from request arrival to its first token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("zili_inter_token_latency_seconds", "Time between successive outputs of a request.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("zili_e2e_request_latency_seconds", "Time from request arrival to its last token.",
                             buckets=_E2E_BUCKETS, registry=self.registry)
        self.finished = Counter("zili_request_success", "Finished choices, by finish reason.",
                                ["finish_reason"], registry=self.registry)
        self.rejected = Counter("zili_requests_rejected", "Requests refused before running, by reason.",
                                ["reason"], registry=self.registry)
        # Chat completions under a reasoning parser (zili.reasoning): the thinking apart from the answer.
        self.reasoning_tokens = Counter("zili_reasoning_tokens", "Generated tokens spent thinking (through "
                                        "</think>), in chat completions of a reasoning model.", registry=self.registry)
        self.answer_tokens = Counter("zili_answer_tokens", "Generated tokens after the thinking, in chat "
                                     "completions of a reasoning model.", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
