"""Which requests join the next prefill batch, and how much of each (chunked prefill).

Admission is optimistic: a request is admitted when the KV pool can hold its uncached prompt now
plus an *estimate* of the tokens it will generate, on top of the estimate for every running
request. The estimate is `new_token_ratio` x the tokens it may still generate (capped at
`CLIP_MAX_NEW_TOKENS`): most requests stop well before max_tokens, so reserving all of it would
leave most of the pool idle. When the estimate is wrong and a decode step finds no room, the
scheduler retracts requests (scheduler.py) and the ratio goes back up; it then decays towards
`MIN_NEW_TOKEN_RATIO` with every decode step that needs no retraction.

Within one batch, a request whose *uncached* prompt shares at least `IN_BATCH_SHARE_MIN` tokens
with a request already admitted is deferred to the next batch, where that shared part is cached
(with the radix cache on): 64 questions behind one long few-shot prefix compute it once, not once
per request of the first batch. Deferring costs the deferred requests one more prefill step; on
CPU a step's fixed cost is about that of 10-15 prompt tokens, so from 16 shared tokens on (a
typical system prompt) waiting is cheaper than recomputing, even for their time to first token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from lmprog.runtime.managers.schedule_batch import Req
from lmprog.runtime.mem_cache.radix_cache import common_prefix_len

CLIP_MAX_NEW_TOKENS = 4096
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = (INIT_NEW_TOKEN_RATIO - MIN_NEW_TOKEN_RATIO) / 600
IN_BATCH_SHARE_MIN = 16


def kv_need(prompt_len: int, cached_len: int, n: int, max_new_tokens: int, page_size: int) -> int:
    """Most KV slots a request family can still take: its uncached prompt once, then `n`
    continuations; each sequence may leave one page partly empty (+ page_size - 1), and each
    continuation past the first copies the prompt's partial last page."""
    slack = page_size - 1
    return (prompt_len - cached_len + slack) + n * (max_new_tokens + slack) + (n - 1) * slack


def estimated_need(req: Req, cached_len: int, ratio: float, page_size: int) -> int:
    """KV slots to set aside for `req` from now on: its uncached tokens and the estimate of
    what its sequences will generate."""
    expected = math.ceil(ratio * min(req.remaining_new_tokens, CLIP_MAX_NEW_TOKENS))
    return kv_need(len(req.fill_ids), cached_len, req.family, expected, page_size)


def running_reserve(reqs: list[Req], ratio: float, page_size: int) -> int:
    """Slots to keep for what running requests are estimated to still generate."""
    return sum(estimated_need(r, r.kv_len, ratio, page_size) for r in reqs)


class AddResult(Enum):
    ADMITTED = "admitted"  # the whole uncached prompt is in the batch
    CHUNKED = "chunked"  # only its first part is; the batch is full
    DEFERRED = "deferred"  # shares an uncached prefix with an admitted request; try next batch
    NO_ROOM = "no_room"  # the batch, the KV pool or the request slots are full


@dataclass
class PrefillAdder:
    """Fills one prefill batch within a token budget, the KV estimate and the request slots.

    `rem_tokens`: free + evictable KV slots minus what running requests are expected to need.
    `budget`: prompt tokens this batch may compute. With `chunk` (chunked prefill on), a request
    longer than what is left of the budget is cut to it; without, only the first request of a
    batch may exceed the budget.
    """

    rem_tokens: int
    budget: int
    free_req_slots: int
    page_size: int
    new_token_ratio: float
    chunk: bool
    dedupe: bool
    reqs: list[Req] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # fill_ids[kv_len:end] computed per request

    def add_chunked(self, req: Req) -> bool:
        """Continues a request whose prompt an earlier batch began; it was admitted then."""
        end = self._chunk_end(req, req.kv_len)
        if end <= req.kv_len:
            return False
        self._take(req, req.kv_len, end, cost=0)
        return True

    def try_add(self, req: Req, cached_len: int, lock_cost: int) -> AddResult:
        """Considers `req`, whose first `cached_len` tokens are cached. The caller locks that
        prefix if this returns ADMITTED or CHUNKED; `lock_cost` is how much of it is evictable
        now, room that locking takes away."""
        n = req.family
        extend = len(req.fill_ids) - cached_len
        need = estimated_need(req, cached_len, self.new_token_ratio, self.page_size) + lock_cost
        if n > self.free_req_slots or need > self.rem_tokens or self.budget <= 0:
            return AddResult.NO_ROOM
        if self.dedupe and self._shares_uncached_prefix(req, cached_len):
            return AddResult.DEFERRED
        if extend <= self.budget or (not self.chunk and not self.reqs):
            self._take(req, cached_len, len(req.fill_ids), need)
            self.free_req_slots -= n
            return AddResult.ADMITTED
        if not self.chunk:
            return AddResult.NO_ROOM
        end = self._chunk_end(req, cached_len)
        if end <= cached_len:
            return AddResult.NO_ROOM
        self._take(req, cached_len, end, need)
        self.free_req_slots -= n
        self.budget = 0
        return AddResult.CHUNKED

    @property
    def full(self) -> bool:
        return self.budget <= 0 or self.free_req_slots <= 0

    def _chunk_end(self, req: Req, start: int) -> int:
        """End of the next chunk from `start`: within the budget, on a page boundary unless
        it completes the prompt."""
        end = len(req.fill_ids)
        if end - start > self.budget:
            end = (start + self.budget) // self.page_size * self.page_size
        return end

    def _take(self, req: Req, start: int, end: int, cost: int) -> None:
        self.reqs.append(req)
        self.ends.append(end)
        self.budget -= end - start
        self.rem_tokens -= cost

    def _shares_uncached_prefix(self, req: Req, cached_len: int) -> bool:
        tokens = req.fill_ids
        return any(
            common_prefix_len(tokens, other.fill_ids) - cached_len >= IN_BATCH_SHARE_MIN
            for other in self.reqs
        )
