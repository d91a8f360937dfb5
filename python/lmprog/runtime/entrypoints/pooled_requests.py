"""What every pooling route shares: reading its inputs and running them as prompt-only requests
whose result is the model's pooled output (an embedding, logits, or logits per token)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request

from lmprog.runtime.entrypoints.common import (
    gather_outputs,
    submit,
    tm_of,
    until_disconnect,
    validate,
)
from lmprog.runtime.entrypoints.errors import APIError
from lmprog.runtime.managers.io_struct import TokenizedGenerateReqInput
from lmprog.runtime.managers.tokenizer_manager import RequestState
from lmprog.runtime.managers.validation import truncate_prompt
from lmprog.runtime.sampling.sampling_params import SamplingParams


async def read_inputs(raw: Any, tm: Any, field: str) -> tuple[list[list[int]], bool]:
    """(token ids per input, is_batch) from a string, strings, token ids or lists of them;
    texts are tokenized off the event loop (inputs may be truncated later: no length bound)."""
    single = isinstance(raw, str) or (
        isinstance(raw, list) and bool(raw) and all(isinstance(t, int) for t in raw)
    )
    raw, batch = ([raw], False) if single else (raw, True)
    if not isinstance(raw, list) or not raw:
        raise APIError(400, f"{field} must be a non-empty string or list", field)
    ids = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            if not item:
                raise APIError(400, f"{field}[{i}] is an empty string", field)
            ids.append(await tm.tokenize(item, within_context=False))
        elif isinstance(item, list) and item and all(isinstance(t, int) for t in item):
            ids.append(list(item))
        else:
            raise APIError(
                400, f"{field}[{i}] must be a non-empty string or list of token ids", field
            )
    return ids, batch


def truncate(ids: list[list[int]], keep: int | None) -> list[list[int]]:
    """`truncate_prompt_tokens`: the last `keep` tokens of each input."""
    try:
        return ids if keep is None else [truncate_prompt(x, keep) for x in ids]
    except ValueError as e:
        raise APIError(400, str(e), "truncate_prompt_tokens") from None


async def run_pooled(
    request: Request,
    ids: list[list[int]],
    rid: str,
    field: str = "input",
    names: list[tuple[str, str]] | None = None,
    token_types: list[list[int] | None] | None = None,
) -> list[list]:
    """The model's output for every input, in order (all validated first: a bad one sends
    nothing). An error names the input as `names` says (per input: its request field and a
    label such as "text_2[3]"; default: `field`, and "field i" in a batch). `token_types`: per
    input, a cross-encoder pair's segment ids (or None)."""
    tm = tm_of(request)
    params = SamplingParams(max_tokens=1)
    if names is None:
        names = [(field, f"{field} {i}" if len(ids) > 1 else "") for i in range(len(ids))]
    for x, (param, label) in zip(ids, names):
        validate(tm, x, params, f"{label}: " if label else "", param)
    types = token_types or [None] * len(ids)
    reqs = [
        TokenizedGenerateReqInput(
            f"{rid}-{k}", x, params, prefill_only=True, token_type_ids=types[k]
        )
        for k, x in enumerate(ids)
    ]
    states = submit(tm, reqs)

    async def one(state: RequestState) -> list:
        outs = await gather_outputs(tm, state)
        last = outs[-1]
        if last.pooled is None:  # aborted
            raise APIError(400, last.finish_reason.message or "the request was aborted")
        return last.pooled

    async def run_all() -> list[list]:
        return await asyncio.gather(*(one(st) for st in states))

    return await until_disconnect(request, run_all())
