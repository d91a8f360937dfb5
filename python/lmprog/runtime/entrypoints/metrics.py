"""Prometheus metrics at GET /metrics, owned by the API process.

Per-request numbers (tokens, latencies) are observed when a request finishes; the scheduler's
counters (running and queued requests, KV usage, prefix-cache query and hit tokens) come from
its ServerInfo reports, refreshed when /metrics is scraped.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from lmprog.runtime.managers.io_struct import SeqOutput, ServerInfo

router = APIRouter()
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        label = {"labelnames": ["model_name"], "registry": self.registry}
        self.requests = Counter(
            "lmprog_requests",
            "Finished requests.",
            ["model_name", "finish_reason"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "lmprog_prompt_tokens", "Prompt tokens of finished requests.", **label
        )
        self.generation_tokens = Counter("lmprog_generation_tokens", "Generated tokens.", **label)
        self.ttft = Histogram(
            "lmprog_time_to_first_token_seconds",
            "Time to first token.",
            buckets=LATENCY_BUCKETS,
            **label,
        )
        self.itl = Histogram(
            "lmprog_inter_token_latency_seconds",
            "Time between consecutive tokens of a sequence.",
            buckets=LATENCY_BUCKETS,
            **label,
        )
        self.e2e = Histogram(
            "lmprog_e2e_request_latency_seconds",
            "End-to-end request latency.",
            buckets=LATENCY_BUCKETS,
            **label,
        )
        self.running = Gauge("lmprog_num_requests_running", "Requests decoding.", **label)
        self.queued = Gauge("lmprog_num_requests_waiting", "Requests waiting to run.", **label)
        self.kv_usage = Gauge(
            "lmprog_kv_cache_usage_ratio", "Share of KV slots neither free nor evictable.", **label
        )
        self.cache_query = Gauge(
            "lmprog_prefix_cache_query_tokens",
            "Prompt tokens looked up in the prefix cache.",
            **label,
        )
        self.cache_hit = Gauge(
            "lmprog_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.", **label
        )
        self.model_name = model_name

    def finished(self, out: SeqOutput) -> None:
        m = self.model_name
        self.requests.labels(m, out.finish_reason.kind).inc()
        self.generation_tokens.labels(m).inc(out.completion_tokens)
        if out.index == 0:
            self.prompt_tokens.labels(m).inc(out.prompt_tokens)
        if out.latencies is not None:
            t = out.latencies
            self.ttft.labels(m).observe(t.ttft)
            itl = self.itl.labels(m)
            for gap in t.gaps:
                itl.observe(gap)
            self.e2e.labels(m).observe(t.e2e)

    def scheduler(self, info: ServerInfo) -> None:
        m, kv, stats = self.model_name, info.kv, info.stats
        self.running.labels(m).set(kv["running_requests"])
        self.queued.labels(m).set(kv["waiting_requests"])
        self.kv_usage.labels(m).set(1 - (kv["free"] + kv["evictable"]) / kv["total"])
        self.cache_query.labels(m).set(stats["cache_query_tokens"])
        self.cache_hit.labels(m).set(stats["cache_hit_tokens"])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    tm = request.app.state.tm
    if tm.alive:
        tm.metrics.scheduler(await tm.get_server_info())
    return Response(generate_latest(tm.metrics.registry), media_type=CONTENT_TYPE_LATEST)
