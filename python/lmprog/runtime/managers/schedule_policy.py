"""Which waiting requests join the next prefill batch.

Admission is conservative: a request is admitted only if the KV pool can hold everything it may
still need (prompt + `n` x max_new_tokens) on top of what the running requests may still need, so
a decode step can never run out of slots. (Retraction, which allows optimistic admission, comes
with the radix cache.)
"""

from __future__ import annotations

from collections import deque

from lmprog.runtime.managers.schedule_batch import Req


def kv_need(prompt_len: int, cached_len: int, n: int, max_new_tokens: int, page_size: int) -> int:
    """Most KV slots a request family can still take: its uncached prompt once, then `n`
    continuations; each sequence may leave one page partly empty (+ page_size - 1), and each
    continuation past the first copies the prompt's partial last page."""
    slack = page_size - 1
    return (prompt_len - cached_len + slack) + n * (max_new_tokens + slack) + (n - 1) * slack


class PrefillAdder:
    """Fills one prefill batch within the token budget, the free KV slots and request slots."""

    def __init__(
        self, free_kv_tokens: int, max_prefill_tokens: int, free_req_slots: int, page_size: int
    ) -> None:
        self.free_kv_tokens = free_kv_tokens
        self.budget = max_prefill_tokens
        self.free_req_slots = free_req_slots
        self.page_size = page_size
        self.admitted: list[Req] = []

    def try_add(self, req: Req, cached_len: int) -> bool:
        """Admits `req` (whose first `cached_len` prompt tokens are cached) if everything fits.
        The first request of a batch may exceed the token budget: there is no chunking yet."""
        n = req.sampling_params.n
        extend = len(req.origin_input_ids) - cached_len
        need = kv_need(len(req.origin_input_ids), cached_len, n, req.max_new_tokens, self.page_size)
        if n > self.free_req_slots or need > self.free_kv_tokens:
            return False
        if self.admitted and extend > self.budget:
            return False
        self.free_req_slots -= n
        self.free_kv_tokens -= need
        self.budget -= extend
        self.admitted.append(req)
        return True


def order_waiting(waiting: deque[Req], policy: str) -> list[Req]:
    """The waiting queue in admission order for `policy` (fcfs: arrival order)."""
    assert policy == "fcfs", policy
    return list(waiting)
