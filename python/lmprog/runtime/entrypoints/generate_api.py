"""SGLang's native `POST /generate` (vLLM's `prompt` + flat parameters also accepted): parsing,
SGLang's logprob fields, and the streamed and whole responses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmprog.runtime.entrypoints.beam_search_api import beam_params, run_beam_search
from lmprog.runtime.entrypoints.common import (
    SAMPLING_FIELDS,
    SSE_DONE,
    SSE_HEADERS,
    gather_outputs,
    make_sampling_params,
    merge_streams,
    require_call,
    sse,
    sse_with_errors,
    submit,
    tm_of,
    tokenize_prompt,
    until_disconnect,
    validate,
)
from lmprog.runtime.entrypoints.errors import APIError
from lmprog.runtime.entrypoints.seq_result import SeqResult, finish_reason_json
from lmprog.runtime.managers.io_struct import SeqOutput, TokenizedGenerateReqInput

router = APIRouter()
# SGLang's names for the native API, mapped to ours (vLLM's).
NATIVE_ALIASES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


@dataclass
class _LogprobRequest:
    """What /generate's logprob fields ask for (SGLang's names)."""

    wanted: bool = False  # return_logprob
    start: int = -1  # logprob_start_len: first prompt position scored; -1: output tokens only
    top: int = 0  # top_logprobs_num, for prompt and output positions alike
    with_text: bool = False  # return_text_in_logprobs

    @classmethod
    def parse(cls, body: dict) -> _LogprobRequest:
        wanted = body.get("return_logprob") or False
        start = body.get("logprob_start_len")
        top = body.get("top_logprobs_num")
        for name, value, low in (("logprob_start_len", start, -1), ("top_logprobs_num", top, 0)):
            if value is not None and (type(value) is not int or value < low):
                raise APIError(400, f"{name} must be an integer >= {low}, got {value!r}", name)
        if not isinstance(wanted, bool):
            raise APIError(400, f"return_logprob must be a bool, got {wanted!r}", "return_logprob")
        return cls(
            wanted,
            -1 if start is None else start,
            top or 0,
            bool(body.get("return_text_in_logprobs")),
        )


async def _parse_generate(
    body: Any, tm: Any
) -> tuple[list[TokenizedGenerateReqInput], bool, _LogprobRequest, dict[str, str]]:
    """(requests, is_batch, what logprobs it asks for, field names as the body gave them)
    from a /generate body; texts are tokenized off the event loop."""
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    text = body.get("text", body.get("prompt"))
    input_ids = body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise APIError(400, "give exactly one of text (or prompt) and input_ids", "text")
    if text is not None:
        batch = isinstance(text, list)
        texts = text if batch else [text]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise APIError(400, "text must be a string or a non-empty list of strings", "text")
        ids = [await tokenize_prompt(tm, t, "text") for t in texts]
    else:
        batch = bool(input_ids) and isinstance(input_ids[0], list)
        ids = input_ids if batch else [input_ids]
        texts = [None] * len(ids)
        if not ids or not all(
            isinstance(x, list) and all(isinstance(t, int) for t in x) for x in ids
        ):
            raise APIError(
                400, "input_ids must be a list of token ids, or a list of such lists", "input_ids"
            )
    raw = body.get("sampling_params") or {}
    # vLLM's shape: sampling parameters at the top level of the body.
    flat = {k: v for k, v in body.items() if k in SAMPLING_FIELDS or k in NATIVE_ALIASES}
    if not isinstance(body.get("use_beam_search", False), bool):
        raise APIError(400, "use_beam_search must be a bool", "use_beam_search")
    per_prompt = raw if isinstance(raw, list) else [raw] * len(ids)
    if len(per_prompt) != len(ids):
        raise APIError(
            400,
            f"sampling_params has {len(per_prompt)} entries for {len(ids)} prompts",
            "sampling_params",
        )
    lp = _LogprobRequest.parse(body)
    rids = _request_ids(body.get("rid"), len(ids), batch, tm.new_rid)
    given: dict[str, str] = {}  # SamplingParams' name -> the body's (max_new_tokens, ...)
    reqs = []
    for p_ids, p_text, sp, rid in zip(ids, texts, per_prompt, rids):
        if not isinstance(sp, dict):
            raise APIError(400, "sampling_params must be an object", "sampling_params")
        given |= {NATIVE_ALIASES[k]: k for k in {**flat, **sp} if k in NATIVE_ALIASES}
        values = {NATIVE_ALIASES.get(k, k): v for k, v in {**flat, **sp}.items()}
        if lp.wanted:
            values.setdefault("logprobs", lp.top)
            if lp.start >= 0:
                values["prompt_logprobs"] = lp.top
        prefill_only = values.get("max_tokens") == 0
        if prefill_only:
            values |= {"max_tokens": 1, "n": 1}
        params = make_sampling_params(values, "sampling_params." if sp else "", given)
        reqs.append(
            TokenizedGenerateReqInput(
                rid,
                p_ids,
                params,
                p_text,
                prefill_only=prefill_only,
                logprob_start_len=max(lp.start, 0),
            )
        )
    return reqs, batch, lp, given


def _request_ids(rid: Any, count: int, batch: bool, new_rid: Any) -> list[str]:
    """The client's request ids (a string, or a list for a batch, as SGLang takes them), or
    new ones."""
    if rid is None:
        return [new_rid() for _ in range(count)]
    rids = rid if isinstance(rid, list) else [rid]
    if (not batch and isinstance(rid, list)) or len(rids) != count:
        raise APIError(400, f"rid must give one id per prompt ({count}), got {rid!r}", "rid")
    if not all(isinstance(r, str) and r for r in rids):
        raise APIError(
            400, f"rid must be a non-empty string (or a list of them), got {rid!r}", "rid"
        )
    return rids


class _LogprobMeta:
    """One sequence's SGLang logprob fields, grown as its reports arrive: each token's text is
    decoded once (a stream re-sends the fields with every event)."""

    def __init__(self, req: TokenizedGenerateReqInput, lp: _LogprobRequest, tokenizer: Any):
        self.lp, self.tokenizer = lp, tokenizer
        self.prompt = req.input_ids[min(lp.start, len(req.input_ids)) :] if lp.start >= 0 else []
        self.fields: dict[str, list] = {
            "input_token_logprobs": [],
            "input_top_logprobs": [],
            "output_token_logprobs": [],
            "output_top_logprobs": [],
        }

    def _triple(self, tid: int, value: float | None) -> list:
        return [value, tid, self.tokenizer.decode([tid]) if self.lp.with_text else None]

    def _tops(self, top: dict[int, float]) -> list:
        return [self._triple(k, v) for k, v in top.items()]

    def add(self, out: SeqOutput) -> None:
        f = self.fields
        for tid, (value, top) in zip(
            self.prompt[len(f["input_token_logprobs"]) :], out.input_logprobs or []
        ):
            f["input_token_logprobs"].append(self._triple(tid, value))
            f["input_top_logprobs"].append(None if value is None else self._tops(top))
        for tid, (value, top) in zip(out.token_ids, out.logprobs or []):
            f["output_token_logprobs"].append(self._triple(tid, value))
            f["output_top_logprobs"].append(self._tops(top))


def _item(
    req: TokenizedGenerateReqInput,
    seq: SeqResult,
    start: float,
    meta_lp: _LogprobMeta | None,
) -> dict:
    last = seq.last
    meta = {
        "id": req.rid,
        "index": seq.index,
        "prompt_tokens": last.prompt_tokens if last else len(req.input_ids),
        "completion_tokens": len(seq.token_ids),
        "cached_tokens": last.cached_tokens if last else 0,
        "finish_reason": finish_reason_json(last),
        "e2e_latency": time.perf_counter() - start,
    }
    if meta_lp is not None:
        meta |= meta_lp.fields
    return {"text": seq.text, "output_ids": seq.token_ids, "meta_info": meta}


@router.post("/generate")
async def generate(request: Request) -> Any:
    require_call(request, "generate")
    tm = tm_of(request)
    body = await request.json()
    reqs, batch, lp, given = await _parse_generate(body, tm)
    prompt_param = "text" if body.get("input_ids") is None else "input_ids"
    for i, r in enumerate(reqs):
        where = f"prompt {i}: " if batch else ""
        validate(tm, r.input_ids, r.sampling_params, where, prompt_param, given)
    if body.get("use_beam_search"):
        max_logprobs = request.app.state.args.max_logprobs
        searches = [(r, beam_params(body, r.sampling_params, max_logprobs)) for r in reqs]
        results = await until_disconnect(
            request, asyncio.gather(*(run_beam_search(tm, r, p) for r, p in searches))
        )
        flat = [item for per_prompt in results for item in per_prompt]
        return JSONResponse(flat if batch or len(flat) > 1 else flat[0])
    stream = bool(body.get("stream"))
    states = submit(tm, reqs, stream=stream)
    start = time.perf_counter()

    def logprob_meta(req: TokenizedGenerateReqInput) -> _LogprobMeta | None:
        return _LogprobMeta(req, lp, tm.tokenizer) if lp.wanted else None

    if stream:
        return StreamingResponse(
            sse_with_errors(_stream(tm, reqs, states, start, logprob_meta)),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )

    async def run_one(req: TokenizedGenerateReqInput, state: Any) -> list[dict]:
        outs = await gather_outputs(tm, state)
        n = 1 if req.prefill_only else req.sampling_params.n
        seqs = {i: (SeqResult(i), logprob_meta(req)) for i in range(n)}
        for out in outs:
            seq, meta = seqs[out.index]
            seq.add(out)
            if meta is not None:
                meta.add(out)
        return [_item(req, seq, start, meta) for seq, meta in seqs.values()]

    async def run_all() -> list[list[dict]]:
        return await asyncio.gather(*(run_one(r, st) for r, st in zip(reqs, states)))

    results = await until_disconnect(request, run_all())
    flat = [item for per_prompt in results for item in per_prompt]
    return JSONResponse(flat if batch or len(flat) > 1 else flat[0])


async def _stream(
    tm: Any,
    reqs: list[TokenizedGenerateReqInput],
    states: list[Any],
    start: float,
    logprob_meta: Any,
) -> AsyncIterator[str]:
    """SSE: each chunk carries one sequence's text so far (SGLang's shape), then [DONE]."""
    seqs: dict[tuple[int, int], tuple[SeqResult, _LogprobMeta | None]] = {}
    async for k, out in merge_streams(tm, states):
        key = (k, out.index)
        if key not in seqs:
            seqs[key] = (SeqResult(out.index), logprob_meta(reqs[k]))
        seq, meta = seqs[key]
        seq.add(out)
        if meta is not None:
            meta.add(out)
        yield sse(_item(reqs[k], seq, start, meta))
    yield SSE_DONE
