"""The dashboard's memory of the last minutes, kept in the API process.

Two sources:
- every SAMPLE_INTERVAL_S, the scheduler's counters and KV figures (`sample`): token rates and
  the prefix-cache hit rate are differences between consecutive samples, so they count tokens
  when they are computed, not when their request ends;
- every finished sequence (`finished`): its latencies (TTFT, the gaps between tokens) and a row
  of the recent-requests table.

`snapshot()` gives the page everything in one JSON object; times are seconds relative to now
(negative), so the page needs no clock agreement with the server.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from lmprog.runtime.managers.io_struct import SeqOutput, ServerInfo

SAMPLE_INTERVAL_S = 1.0
WINDOW_S = 600.0  # what the charts can show
LATENCY_BUCKET_S = 10.0  # percentiles are taken over the sequences finished in each bucket
RECENT_REQUESTS = 50
PREVIEW_CHARS = 80


@dataclass
class Sample:
    t: float
    prefill_tokens: int
    generated_tokens: int
    cache_query_tokens: int
    cache_hit_tokens: int
    running: int
    waiting: int
    kv_free: int
    kv_evictable: int
    kv_total: int


@dataclass
class Finished:
    t: float
    rid: str
    preview: str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str
    ttft: float | None
    e2e: float | None
    gaps: list[float]


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by the nearest rank, of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class DashboardHistory:
    def __init__(self, hide_prompts: bool = False) -> None:
        self.hide_prompts = hide_prompts
        self.samples: deque[Sample] = deque(maxlen=int(WINDOW_S / SAMPLE_INTERVAL_S) + 1)
        self.finished_seqs: deque[Finished] = deque()
        self.recent: deque[Finished] = deque(maxlen=RECENT_REQUESTS)
        # Since start, counted as /metrics counts them (prompt tokens once per request).
        self.totals = {"sequences": 0, "prompt_tokens": 0, "generation_tokens": 0}

    # ---- recording ------------------------------------------------------------------------
    def sample(self, info: ServerInfo, now: float | None = None) -> None:
        kv, stats = info.kv, info.stats
        self.samples.append(
            Sample(
                t=time.monotonic() if now is None else now,
                prefill_tokens=int(stats["prefill_tokens"]),
                generated_tokens=int(stats["generated_tokens"]),
                cache_query_tokens=int(stats["cache_query_tokens"]),
                cache_hit_tokens=int(stats["cache_hit_tokens"]),
                running=kv["running_requests"],
                waiting=kv["waiting_requests"],
                kv_free=kv["free"],
                kv_evictable=kv["evictable"],
                kv_total=kv["total"],
            )
        )

    def finished(self, out: SeqOutput, prompt_text: str | None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.totals["sequences"] += 1
        self.totals["generation_tokens"] += out.completion_tokens
        if out.index == 0:
            self.totals["prompt_tokens"] += out.prompt_tokens
        t = out.latencies
        row = Finished(
            t=now,
            rid=out.rid if out.index == 0 else f"{out.rid}[{out.index}]",
            preview=None if self.hide_prompts or prompt_text is None
            else prompt_text[:PREVIEW_CHARS],
            prompt_tokens=out.prompt_tokens,
            cached_tokens=out.cached_tokens,
            completion_tokens=out.completion_tokens,
            finish_reason=out.finish_reason.kind if out.finish_reason else "?",
            ttft=t.ttft if t else None,
            e2e=t.e2e if t else None,
            gaps=list(t.gaps) if t else [],
        )  # fmt: skip
        self.recent.append(row)
        self.finished_seqs.append(row)
        while self.finished_seqs and self.finished_seqs[0].t < now - WINDOW_S:
            self.finished_seqs.popleft()

    # ---- the page's view ------------------------------------------------------------------
    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        return {
            "window_s": WINDOW_S,
            "series": self._rates(now),
            "latency": self._latency(now),
            "recent": [self._row(r, now) for r in reversed(self.recent)],
        }

    def _rates(self, now: float) -> list[dict[str, Any]]:
        """One point per sample interval: token rates, the hit rate of the prompt tokens
        admitted in it (None when none were), requests and KV use at its end."""
        points, samples = [], list(self.samples)
        for a, b in itertools.pairwise(samples):
            dt = max(b.t - a.t, 1e-6)
            queried = b.cache_query_tokens - a.cache_query_tokens
            hits = b.cache_hit_tokens - a.cache_hit_tokens
            points.append(
                {
                    "t": round(b.t - now, 2),
                    "prompt_tps": round((b.prefill_tokens - a.prefill_tokens) / dt, 2),
                    "generated_tps": round((b.generated_tokens - a.generated_tokens) / dt, 2),
                    "hit_rate": round(hits / queried, 4) if queried else None,
                    "running": b.running,
                    "waiting": b.waiting,
                    "kv_free": b.kv_free,
                    "kv_evictable": b.kv_evictable,
                    "kv_in_use": b.kv_total - b.kv_free - b.kv_evictable,
                }
            )
        return points

    def _latency(self, now: float) -> list[dict[str, Any]]:
        """TTFT and inter-token latency percentiles (p50, p90, p99) per LATENCY_BUCKET_S."""
        buckets: dict[int, list[Finished]] = {}
        for row in self.finished_seqs:
            if row.ttft is not None:
                buckets.setdefault(int((now - row.t) // LATENCY_BUCKET_S), []).append(row)
        points = []
        for age in sorted(buckets, reverse=True):
            rows = buckets[age]
            ttfts = [r.ttft for r in rows]
            gaps = [g for r in rows for g in r.gaps]
            point: dict[str, Any] = {"t": -(age + 0.5) * LATENCY_BUCKET_S, "n": len(rows)}
            for q, name in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
                point[f"ttft_{name}"] = round(percentile(ttfts, q), 4)
                point[f"itl_{name}"] = round(percentile(gaps, q), 4) if gaps else None
            points.append(point)
        return points

    @staticmethod
    def _row(r: Finished, now: float) -> dict[str, Any]:
        return {
            "age_s": round(now - r.t, 1),
            "rid": r.rid,
            "prompt": r.preview,
            "prompt_tokens": r.prompt_tokens,
            "cached_tokens": r.cached_tokens,
            "cached_share": round(r.cached_tokens / r.prompt_tokens, 3) if r.prompt_tokens else 0,
            "completion_tokens": r.completion_tokens,
            "finish_reason": r.finish_reason,
            "ttft_s": None if r.ttft is None else round(r.ttft, 4),
            "e2e_s": None if r.e2e is None else round(r.e2e, 4),
        }
