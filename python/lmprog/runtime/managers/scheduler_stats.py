"""SchedulerStats: the scheduler's counters since start (the server's metrics and
/get_server_info read them; the offline LLM's get_cache_stats too)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SchedulerStats:
    """Counters since start (the server's metrics read them)."""

    prefill_tokens: int = 0  # prompt tokens computed (cached ones excluded)
    generated_tokens: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    cache_query_tokens: int = 0  # prompt tokens of admitted requests
    cache_hit_tokens: int = 0  # of those, found in the prefix cache
    retracted_requests: int = 0
    jump_forward_tokens: int = 0  # tokens a grammar forced, appended without sampling

    @property
    def cache_hit_rate(self) -> float:
        return self.cache_hit_tokens / self.cache_query_tokens if self.cache_query_tokens else 0.0
