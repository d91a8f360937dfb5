"""`POST /generate` with `"use_beam_search": true` (the seeds' vLLM server): the `n` best beams of
each prompt, best first, each with its cumulative logprob (sampling/beam_search.py has the
search). Each step submits one one-token request per live beam through the tokenizer manager,
so concurrent searches and ordinary requests batch together in the scheduler."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from lmprog.runtime.entrypoints.common import gather_outputs, submit
from lmprog.runtime.entrypoints.errors import APIError
from lmprog.runtime.managers.io_struct import TokenizedGenerateReqInput
from lmprog.runtime.sampling.beam_search import BeamSearch, BeamSearchParams
from lmprog.runtime.sampling.param_error import ParamError
from lmprog.runtime.sampling.sampling_params import SamplingParams


def beam_params(body: dict, params: SamplingParams, max_logprobs: int) -> BeamSearchParams:
    """The search a /generate body asks for: `n` beams of up to `max_tokens`, `ignore_eos` and
    a top-level `length_penalty`; sampling it cannot honour is a 400."""
    given = body.get("sampling_params") if isinstance(body.get("sampling_params"), dict) else {}
    temperature = given.get("temperature", body.get("temperature"))
    if temperature not in (None, 0, 0.0):
        raise APIError(400, f"beam search is greedy: temperature must be 0, got {temperature!r}",
                       "temperature")  # fmt: skip
    if body.get("stream"):
        raise APIError(400, "use_beam_search cannot stream its results", "stream")
    length_penalty = body.get("length_penalty", 1.0)
    if not isinstance(length_penalty, (int, float)) or isinstance(length_penalty, bool):
        raise APIError(400, f"length_penalty must be a number, got {length_penalty!r}",
                       "length_penalty")  # fmt: skip
    if 2 * params.n > max_logprobs:
        raise APIError(
            400,
            f"use_beam_search with n={params.n} needs the top {2 * params.n} logprobs per step, "
            f"more than the server's max_logprobs ({max_logprobs})",
            "n",
        )
    try:
        return BeamSearchParams(
            params.n, params.max_tokens or 16, params.ignore_eos, 0.0, float(length_penalty)
        )
    except ParamError as e:
        raise APIError(400, str(e), e.param) from None


async def run_beam_search(
    tm: Any, req: TokenizedGenerateReqInput, params: BeamSearchParams
) -> list[dict]:
    """One prompt's search through the tokenizer manager; /generate's items, best first."""
    start = time.perf_counter()
    search = BeamSearch(req.input_ids, params, tm.model_info.eos_token_ids)
    step = SamplingParams(
        max_tokens=1, temperature=0, logprobs=search.candidates_per_beam, ignore_eos=True
    )
    while not search.done:
        beams = [TokenizedGenerateReqInput(tm.new_rid(), ids, step) for ids in search.prompts()]
        states = submit(tm, beams)
        outs = await asyncio.gather(*(gather_outputs(tm, s) for s in states))
        search.advance([next(o.logprobs for o in seq if o.logprobs)[0][1] for seq in outs])
    result = search.result(tm.tokenizer.decode)
    items = []
    for i, seq in enumerate(result.sequences):
        generated = seq.tokens[search.prompt_len :]
        reason: dict[str, Any] = {"type": seq.finish_reason}
        if seq.stop_reason is not None:
            reason["matched"] = seq.stop_reason
        meta = {
            "id": req.rid,
            "index": i,
            "prompt_tokens": search.prompt_len,
            "completion_tokens": len(generated),
            "cumulative_logprob": seq.cum_logprob,
            "finish_reason": reason,
            "e2e_latency": time.perf_counter() - start,
        }
        items.append({"text": seq.text, "output_ids": generated, "meta_info": meta})
    return items
