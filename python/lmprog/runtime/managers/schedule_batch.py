"""A request's state in the scheduler (`Req`) and turning a list of them into one step.

Token bookkeeping of a running request:

    fill_ids = prompt + output          (output[-1] was just sampled and has no KV yet)
    kv_len   = tokens whose KV is in the pool = len(fill_ids) - 1 while decoding
    prefix_indices = KV slots of fill_ids[:len(prefix_indices)], owned by the prefix cache
    req_to_token[req_pool_idx, :kv_len] = the KV slots of fill_ids[:kv_len]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lmprog.runtime.managers.io_struct import FinishReason
from lmprog.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode
from lmprog.runtime.sampling.sampling_params import SamplingParams

if TYPE_CHECKING:
    from lmprog.runtime.managers.detokenizer import OutputText
    from lmprog.runtime.mem_cache.memory_pool import ReqToTokenPool
    from lmprog.runtime.sampling.constrained.matcher import Matcher


@dataclass
class ReqTimes:
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    token_gaps: list[float] = field(default_factory=list)  # seconds between its tokens


@dataclass(eq=False)
class Req:
    """One output sequence being generated (a prompt with `n` > 1 forks into `n` of these)."""

    rid: str
    origin_input_ids: list[int]
    sampling_params: SamplingParams
    seed: int  # 64-bit; the sampler's stream for this sequence
    max_new_tokens: int  # max_tokens, clipped to the context
    output_text: OutputText
    eos_token_ids: frozenset[int]
    input_text: str | None = None
    index: int = 0  # which of the n continuations
    # How many of the request's n sequences this Req reports for: n until its prompt is
    # prefilled and it forks into n Reqs, then 1 (None: derived). A request that ends before
    # forking (aborted or failed in its prefill) ends all n at once.
    family: int | None = None
    output_ids: list[int] = field(default_factory=list)
    req_pool_idx: int | None = None
    prefix_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    last_node: Any = None
    kv_len: int = 0
    num_cached_tokens: int = 0
    finished_reason: FinishReason | None = None
    cumulative_logprob: float | None = None
    # Per generated token: (chosen logprob, {token_id: logprob} of the top-k), when asked.
    logprobs: list[tuple[float, dict[int, float]]] | None = None
    times: ReqTimes = field(default_factory=lambda: ReqTimes(time.time()))
    stream: bool = False  # the server reports each new token, not only the end
    prefill_only: bool = False  # finishes once its prompt is computed (max_new_tokens 0)
    reported_tokens: int = 0  # output tokens already reported to the API process
    # Prompt-token logprobs (sampling_params.prompt_logprobs): entry j is token
    # input_logprob_start + j's (None at position 0), filled as prefill computes them.
    input_logprob_start: int | None = None
    input_logprobs: list[tuple[float | None, dict[int, float]]] = field(default_factory=list)
    # A pooling model's output when finished (io_struct.SeqOutput.pooled); a token
    # classifier's rows gather here chunk by chunk.
    pooled: list | None = None
    token_type_ids: list[int] | None = None  # a cross-encoder's segment ids (encoders only)
    # Constrained decoding: the grammar's compile future until admission, then its matcher.
    grammar_future: Any = None
    matcher: Matcher | None = None
    jump_forward: bool = False  # append the tokens the grammar forces without sampling them

    def __post_init__(self) -> None:
        if self.family is None:
            self.family = 1 if self.prefill_only else self.sampling_params.n

    @property
    def fill_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    @property
    def remaining_new_tokens(self) -> int:
        return self.max_new_tokens - len(self.output_ids)

    @property
    def input_logprobs_pending(self) -> bool:
        start = self.input_logprob_start
        return start is not None and start + len(self.input_logprobs) < len(self.origin_input_ids)

    @property
    def match_key(self) -> list[int]:
        """The tokens to look up in the prefix cache: all but the last (whose logits sampling
        needs), and none from which prompt logprobs are still to be computed (a cached token
        has no logits)."""
        limit = len(self.fill_ids) - 1
        if self.input_logprobs_pending:
            limit = min(limit, max(self.input_logprob_start + len(self.input_logprobs) - 1, 0))
        return self.fill_ids[:limit]

    def input_logprob_rows(self, end: int) -> tuple[int, int]:
        """Positions [a, b) among those this extend computes (kv_len..end) whose logits give
        pending prompt logprobs: position p's logits score prompt token p + 1."""
        if not self.input_logprobs_pending:
            return (self.kv_len, self.kv_len)
        first = self.input_logprob_start + len(self.input_logprobs) - 1
        a = max(self.kv_len, first)
        return (a, max(a, min(end, len(self.origin_input_ids) - 1)))

    def record_input_logprobs(self, entries: list[tuple[float, dict[int, float]]]) -> None:
        self.input_logprobs.extend(entries)

    def append_token(self, token_id: int, context_len: int, forced: bool = False) -> None:
        """Records a sampled token (or, `forced`, one the grammar forced and already accepted)
        and decides whether the sequence is finished."""
        now = time.time()
        if self.times.first_token is None:
            self.times.first_token = now
        else:
            self.times.token_gaps.append(now - self.times.last_token)
        self.times.last_token = now
        self.output_ids.append(token_id)
        params = self.sampling_params
        n_out = len(self.output_ids)
        if self.matcher is not None and not forced and not self.matcher.accept(token_id):
            message = f"the grammar rejected token {token_id} that its own mask allowed"
            self.finished_reason = FinishReason("abort", message=message)
            return
        hit_eos = token_id in self.eos_token_ids and not params.ignore_eos
        hit_stop_id = token_id in (params.stop_token_ids or ())
        if (hit_eos or hit_stop_id) and n_out > params.min_tokens:
            self.finished_reason = FinishReason("stop", None if hit_eos else token_id)
            return
        # A stop string completed before min_tokens does not count, now or later (as vLLM).
        matched = self.output_text.append([token_id], check_stop=n_out >= params.min_tokens)
        if matched is not None:
            self.finished_reason = FinishReason("stop", matched)
        elif self.matcher is not None and self.matcher.terminated:
            self.finished_reason = FinishReason("stop")  # the grammar is complete
        elif n_out >= self.max_new_tokens or len(self.origin_input_ids) + n_out >= context_len:
            self.finished_reason = FinishReason("length")

    def record_logprob(self, chosen: float, top: dict[int, float]) -> None:
        """Keeps the sampled token's logprob and the top-k of its step."""
        if self.logprobs is None:
            self.logprobs, self.cumulative_logprob = [], 0.0
        self.logprobs.append((chosen, top))
        self.cumulative_logprob += chosen

    def finish(self, reason: FinishReason) -> None:
        self.finished_reason = reason

    def fork(self, index: int, seed: int, output_text: OutputText) -> Req:
        """A sibling continuation of the same prompt (shares nothing mutable with self)."""
        return Req(
            rid=self.rid,
            origin_input_ids=self.origin_input_ids,
            sampling_params=self.sampling_params,
            seed=seed,
            max_new_tokens=self.max_new_tokens,
            output_text=output_text,
            eos_token_ids=self.eos_token_ids,
            input_text=self.input_text,
            index=index,
            family=1,
            num_cached_tokens=self.num_cached_tokens,
            stream=self.stream,
            input_logprob_start=self.input_logprob_start,
            input_logprobs=self.input_logprobs,
            matcher=self.matcher.clone() if self.matcher is not None else None,
            jump_forward=self.jump_forward,
            times=ReqTimes(self.times.arrival, self.times.first_scheduled),
        )


@dataclass
class ScheduledBatch:
    """One step's batch: its mode for the scheduler (a decode step may run as an extend when a
    grammar forced several tokens), its requests and the model's ForwardBatch."""

    mode: ForwardMode
    reqs: list[Req]
    forward_batch: ForwardBatch
    # Extend only: per request, the positions [a, b) whose logits score prompt tokens (their
    # logits rows come first, before the one sampling row per request).
    prompt_rows: list[tuple[int, int]] | None = None
    # The sequences the step stands for: its requests, and once they forked, their n > 1
    # sequences (a failed step ends them all).
    seqs: list[Req] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.seqs = self.seqs or list(self.reqs)


def build_forward_batch(
    mode: ForwardMode,
    reqs: list[Req],
    ends: list[int],
    req_to_token_pool: ReqToTokenPool,
    alloc_extend: Callable[[list[int], list[int], list[int]], torch.Tensor | None],
    device: torch.device,
) -> ForwardBatch | None:
    """Allocates KV for fill_ids[kv_len:end] of each request and records it; None (nothing
    allocated) if the pool is too full.

    Extend computes a prompt, or a chunk of one; decode computes each request's last sampled
    token (end = kv_len + 1). On success every request's `kv_len` is its `end`.
    """
    prefix_lens = [r.kv_len for r in reqs]
    if mode.is_decode:
        assert all(e == p + 1 == len(r.fill_ids) for r, p, e in zip(reqs, prefix_lens, ends)), (
            "decode of a stale request"
        )
    last_locs = [req_to_token_pool.last_slot(r.req_pool_idx, r.kv_len) for r in reqs]
    out_cache_loc = alloc_extend(prefix_lens, ends, last_locs)  # host int64
    if out_cache_loc is None:
        return None
    rows = [r.req_pool_idx for r in reqs]
    extend_lens = [e - p for p, e in zip(prefix_lens, ends)]
    req_to_token_pool.write_runs(rows, prefix_lens, extend_lens, out_cache_loc)
    input_ids: list[int] = []
    for r, p, e in zip(reqs, prefix_lens, ends):
        input_ids.extend(r.fill_ids[p:e])
        r.kv_len = e
    return ForwardBatch.build(
        mode, input_ids, rows, prefix_lens, extend_lens, out_cache_loc, device
    )


def build_encode_batch(reqs: list[Req], device: torch.device) -> ForwardBatch:
    """An encoder step over whole prompts: no KV slots, no request rows; the token types of
    cross-encoder pairs, when any request has them."""
    lens = [len(r.origin_input_ids) for r in reqs]
    types = None
    if any(r.token_type_ids is not None for r in reqs):
        flat = [t for r in reqs for t in (r.token_type_ids or [0] * len(r.origin_input_ids))]
        assert len(flat) == sum(lens), "token_type_ids must give one segment id per token"
        types = torch.tensor(flat, dtype=torch.int64, device=device)
    return ForwardBatch.build(
        ForwardMode.ENCODE,
        [t for r in reqs for t in r.origin_input_ids],
        [0] * len(reqs),
        [0] * len(reqs),
        lens,
        torch.empty(0, dtype=torch.int64),
        device,
        token_type_ids=types,
    )
