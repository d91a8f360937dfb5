"""Finished sequences (scheduler `Req`s) -> the offline API's RequestOutput, in vLLM's shape."""

from __future__ import annotations

from typing import Any

from lmprog.runtime.engine.outputs import (
    CompletionOutput,
    Logprob,
    RequestMetrics,
    RequestOutput,
)
from lmprog.runtime.managers.schedule_batch import Req


def logprob_dict(
    token: int, chosen: float, top: dict[int, float], tokenizer: Any
) -> dict[int, Logprob]:
    """vLLM's per-position entry: the top-k by rank, plus the scored token if not among them."""
    entry = {
        tid: Logprob(lp, rank, tokenizer.decode([tid]))
        for rank, (tid, lp) in enumerate(top.items(), start=1)
    }
    if token not in entry:
        entry[token] = Logprob(chosen, None, tokenizer.decode([token]))
    return entry


def _completion(req: Req, tokenizer: Any) -> CompletionOutput:
    logprobs = None
    if req.logprobs is not None:
        logprobs = [
            logprob_dict(token, chosen, top, tokenizer)
            for token, (chosen, top) in zip(req.output_ids, req.logprobs)
        ]
    reason = req.finished_reason
    return CompletionOutput(
        index=req.index,
        text=req.output_text.text,
        token_ids=list(req.output_ids),
        cumulative_logprob=req.cumulative_logprob,
        logprobs=logprobs,
        finish_reason=reason.kind if reason else None,
        stop_reason=reason.matched if reason else None,
    )


def _prompt_logprobs(req: Req, tokenizer: Any) -> list[dict[int, Logprob] | None] | None:
    """vLLM's prompt_logprobs: None for the first prompt token, then one entry per token."""
    if req.input_logprob_start is None:
        return None
    tokens = req.origin_input_ids[req.input_logprob_start :]
    return [
        None if chosen is None else logprob_dict(token, chosen, top, tokenizer)
        for token, (chosen, top) in zip(tokens, req.input_logprobs)
    ]


def request_output(rid: str, seqs: list[Req], tokenizer: Any) -> RequestOutput:
    seqs = sorted(seqs, key=lambda r: r.index)
    first = seqs[0]
    t = first.times
    metrics = RequestMetrics(
        arrival_time=t.arrival,
        first_scheduled_time=t.first_scheduled,
        first_token_time=min(
            (s.times.first_token for s in seqs if s.times.first_token), default=None
        ),
        last_token_time=max((s.times.last_token for s in seqs if s.times.last_token), default=None),
        finished_time=max(s.times.finished for s in seqs if s.times.finished),
    )
    errors = [
        s.finished_reason.message for s in seqs if s.finished_reason and s.finished_reason.message
    ]
    return RequestOutput(
        request_id=rid,
        prompt=first.input_text,
        prompt_token_ids=list(first.origin_input_ids),
        outputs=[_completion(s, tokenizer) for s in seqs],
        finished=True,
        num_cached_tokens=first.num_cached_tokens,
        metrics=metrics,
        prompt_logprobs=_prompt_logprobs(first, tokenizer),
        error=errors[0] if errors else None,
    )
