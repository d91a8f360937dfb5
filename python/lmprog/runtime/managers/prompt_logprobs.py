"""Prompt logprobs in a prefill step: which logits rows to compute, and scoring them.

A request that asks for prompt logprobs needs the logits of the prompt positions it has not
scored yet (position p's logits score prompt token p + 1), not only its last row. In an extend
step the model computes, per request i, the rows [a_i, b_i) first and then one sampling row per
request:

    logits rows:   [ r0: a0..b0 | r1: a1..b1 | ... | last of r0, last of r1, ... ]
                     ^ prompt rows (scored here)     ^ sampling rows (as without logprobs)
"""

from __future__ import annotations

import torch

from lmprog.runtime.layers.logprobs import token_logprobs
from lmprog.runtime.managers.schedule_batch import Req
from lmprog.runtime.model_executor.forward_batch import ForwardBatch


def prompt_logits_indices(
    fb: ForwardBatch, spans: list[tuple[int, int]], starts: list[int]
) -> torch.Tensor:
    """Indices into the step's flattened tokens: every span's rows, then each request's last.
    Request i's new tokens start at offset_i (the tokens of the requests before it), so its
    position p is row offset_i + p - starts[i]."""
    offsets = fb.last_token_indices() + 1 - fb.extend_seq_lens
    device = fb.input_ids.device
    rows = [
        torch.arange(a, b, device=device) + (off - s)
        for (a, b), off, s in zip(spans, offsets.tolist(), starts)
    ]
    return torch.cat([*rows, fb.last_token_indices()])


def record_prompt_logprobs(
    reqs: list[Req], spans: list[tuple[int, int]], logits: torch.Tensor
) -> torch.Tensor:
    """Scores each request's span rows into its input logprobs; returns the sampling rows."""
    lo = 0
    for req, (a, b) in zip(reqs, spans):
        if b == a:
            continue
        targets = torch.tensor(req.origin_input_ids[a + 1 : b + 1], device=logits.device)
        top = req.sampling_params.prompt_logprobs
        req.record_input_logprobs(token_logprobs(logits[lo : lo + b - a], targets, top))
        lo += b - a
    return logits[lo:]
