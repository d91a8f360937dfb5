"""What the front hears of one sequence after a step: its new tokens and text, or its end.

The server's scheduler process sends these reports over ZMQ; the AsyncLLM's engine thread hands
them to the event loop. Making a report advances the sequence's `reported_tokens` and its text's
stream position, so each sequence has exactly one reporter.
"""

from __future__ import annotations

import dataclasses

from lmprog.runtime.managers.io_struct import Latencies, RequestError, SeqOutput
from lmprog.runtime.managers.schedule_batch import Req


def report(req: Req) -> list[SeqOutput | RequestError]:
    """A sequence's news this step. A request that ended before forking (aborted or failed in
    its prefill) ends all its n sequences; one refused or failed ends as a RequestError."""
    reason = req.finished_reason
    if reason is not None and reason.kind == "error":  # refused, or failed while running
        status = 500 if reason.internal else 400
        return [RequestError(req.rid, reason.message or "the request failed", status)]
    start, req.reported_tokens = req.reported_tokens, len(req.output_ids)
    # Prompt logprobs go out once, in a sequence's first report (which has tokens or is its
    # last).
    scored = start == 0 and req.input_logprob_start is not None
    out = SeqOutput(
        rid=req.rid,
        index=req.index,
        token_ids=req.output_ids[start:],
        text=req.output_text.stream_delta(),
        logprobs=req.logprobs[start:] if req.logprobs is not None else None,
        finish_reason=req.finished_reason,
        prompt_tokens=len(req.origin_input_ids),
        completion_tokens=len(req.output_ids),
        cached_tokens=req.num_cached_tokens,
        latencies=_latencies(req) if req.finished else None,
        input_logprobs=req.input_logprobs if scored else None,
        pooled=req.pooled,
    )
    unforked = [dataclasses.replace(out, index=i) for i in range(1, req.family)]
    return [out, *unforked] if req.finished else [out]


def _latencies(req: Req) -> Latencies | None:
    t = req.times
    if t.first_token is None or t.finished is None:
        return None
    return Latencies(t.first_token - t.arrival, t.finished - t.arrival, t.token_gaps)
