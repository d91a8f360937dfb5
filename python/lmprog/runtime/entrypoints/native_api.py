"""Native routes: /generate (SGLang's shape; vLLM's `prompt` + flat parameters also accepted),
health, model and server info, cache flush, abort, tokenize and detokenize."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmprog.runtime.entrypoints.common import (
    SAMPLING_FIELDS,
    SSE_DONE,
    SSE_HEADERS,
    admit,
    gather_outputs,
    make_sampling_params,
    merge_streams,
    require_kind,
    sse,
    tm_of,
    until_disconnect,
    validate,
)
from lmprog.runtime.entrypoints.errors import APIError, error_payload
from lmprog.runtime.managers.io_struct import SeqOutput, TokenizedGenerateReqInput
from lmprog.runtime.sampling.sampling_params import SamplingParams

router = APIRouter()
HEALTH_GENERATE_TIMEOUT = 20.0
# SGLang's names for the native API, mapped to ours (vLLM's).
NATIVE_ALIASES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


@dataclass
class SeqResult:
    """One sequence of a request, accumulated from its reports."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)
    input_logprobs: list[tuple[float | None, dict[int, float]]] = field(default_factory=list)
    last: SeqOutput | None = None

    def add(self, out: SeqOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.input_logprobs += out.input_logprobs or []
        self.last = out


def finish_reason_json(out: SeqOutput | None) -> dict | None:
    if out is None or out.finish_reason is None:
        return None
    reason = out.finish_reason
    body: dict[str, Any] = {"type": reason.kind}
    if reason.matched is not None:
        body["matched"] = reason.matched
    if reason.message is not None:
        body["message"] = reason.message
    return body


# ---- health and info ------------------------------------------------------------------------
@router.get("/health")
async def health(request: Request) -> JSONResponse:
    alive = tm_of(request).alive
    return JSONResponse({"status": "ok" if alive else "scheduler dead"}, 200 if alive else 503)


@router.get("/health_generate")
async def health_generate(request: Request) -> JSONResponse:
    """Really generates one token (through the whole path), within a timeout."""
    tm = tm_of(request)
    params = SamplingParams(max_tokens=1, temperature=0)
    token = tm.tokenizer.bos_token_id or tm.tokenizer.cls_token_id or 0
    # On an embedding server the same call embeds one token.
    embedding = request.app.state.model_info.is_embedding
    probe = TokenizedGenerateReqInput(tm.new_rid(), [token], params, prefill_only=embedding)

    async def one() -> list:
        return await gather_outputs(tm.generate(probe))

    try:
        await asyncio.wait_for(one(), HEALTH_GENERATE_TIMEOUT)
    except (TimeoutError, APIError) as e:
        return JSONResponse({"status": f"unhealthy: {e or 'timed out'}"}, 503)
    return JSONResponse({"status": "ok"})


@router.get("/get_model_info")
async def get_model_info(request: Request) -> dict:
    info, args = request.app.state.model_info, request.app.state.args
    return {
        "model_path": args.model_path,
        "served_model_name": args.model_name,
        "tokenizer_path": args.tokenizer_path or args.model_path,
        "is_generation": not info.is_embedding,
        "is_embedding": info.is_embedding,
        "embedding_dim": info.embedding_dim,
        # Role prefixes/suffixes derived from the model's chat template (None: none found).
        "chat_template": request.app.state.chat_roles,
        "context_length": info.context_len,
        "vocab_size": info.vocab_size,
        "device": info.device,
        "dtype": info.dtype,
    }


@router.get("/get_server_info")
async def get_server_info(request: Request) -> dict:
    info = await tm_of(request).get_server_info()
    args = request.app.state.args
    return {
        "server_args": {k: v for k, v in vars(args).items() if k != "api_key"},
        "kv_cache": info.kv,
        "scheduler": info.stats,
        "max_total_tokens": request.app.state.model_info.max_total_tokens,
    }


@router.post("/flush_cache")
async def flush_cache(request: Request) -> JSONResponse:
    if await tm_of(request).flush_cache():
        return JSONResponse({"success": True, "message": "cache flushed"})
    return JSONResponse(
        {"success": False, "message": "not flushed: requests are running; retry when idle"}, 409
    )


@router.post("/abort_request")
async def abort_request(request: Request) -> dict:
    body = await request.json()
    rid = body.get("rid") if isinstance(body, dict) else None
    if not isinstance(rid, str):
        raise APIError(400, "rid must be the request id (a string)", "rid")
    return {"success": await tm_of(request).abort(rid)}


@router.post("/tokenize")
async def tokenize(request: Request) -> dict:
    body = await request.json()
    text = body.get("text", body.get("prompt")) if isinstance(body, dict) else None
    if not isinstance(text, str):
        raise APIError(400, "text must be a string", "text")
    add_special = bool(body.get("add_special_tokens", True))
    ids = tm_of(request).tokenizer.encode(text, add_special_tokens=add_special)
    return {
        "tokens": ids,
        "count": len(ids),
        "max_model_len": request.app.state.model_info.context_len,
    }


@router.post("/detokenize")
async def detokenize(request: Request) -> dict:
    body = await request.json()
    ids = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise APIError(400, "tokens must be a list of token ids", "tokens")
    vocab = request.app.state.model_info.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "tokens")
    return {"text": tm_of(request).tokenizer.decode(ids)}


# ---- generate -------------------------------------------------------------------------------
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


def _parse_generate(
    body: Any, tokenizer: Any, new_rid: Any
) -> tuple[list[TokenizedGenerateReqInput], bool, _LogprobRequest]:
    """(requests, is_batch, what logprobs it asks for) from a /generate body."""
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
        ids = [tokenizer.encode(t) for t in texts]
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
    if body.get("use_beam_search"):
        raise APIError(400, "use_beam_search is not supported (sampling only)", "use_beam_search")
    per_prompt = raw if isinstance(raw, list) else [raw] * len(ids)
    if len(per_prompt) != len(ids):
        raise APIError(
            400,
            f"sampling_params has {len(per_prompt)} entries for {len(ids)} prompts",
            "sampling_params",
        )
    lp = _LogprobRequest.parse(body)
    rids = [new_rid() for _ in ids]
    if body.get("rid") is not None and not batch:
        rids = [str(body["rid"])]
    reqs = []
    for p_ids, p_text, sp, rid in zip(ids, texts, per_prompt, rids):
        if not isinstance(sp, dict):
            raise APIError(400, "sampling_params must be an object", "sampling_params")
        values = {NATIVE_ALIASES.get(k, k): v for k, v in {**flat, **sp}.items()}
        if lp.wanted:
            values.setdefault("logprobs", lp.top)
            if lp.start >= 0:
                values["prompt_logprobs"] = lp.top
        prefill_only = values.get("max_tokens") == 0
        if prefill_only:
            values |= {"max_tokens": 1, "n": 1}
        params = make_sampling_params(values, "sampling_params.")
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
    return reqs, batch, lp


def _logprob_meta(
    req: TokenizedGenerateReqInput, seq: SeqResult, lp: _LogprobRequest, tokenizer: Any
) -> dict:
    """SGLang's logprob fields: [logprob, token id, text or None] per position, and per
    position the top-k as such triples (None at prompt position 0)."""

    def triple(tid: int, value: float | None) -> list:
        return [value, tid, tokenizer.decode([tid]) if lp.with_text else None]

    def tops(top: dict[int, float]) -> list:
        return [triple(k, v) for k, v in top.items()]

    prompt = req.input_ids[min(lp.start, len(req.input_ids)) :] if lp.start >= 0 else []
    scored = list(zip(prompt, seq.input_logprobs))
    return {
        "input_token_logprobs": [triple(t, v) for t, (v, _) in scored],
        "input_top_logprobs": [None if v is None else tops(top) for _, (v, top) in scored],
        "output_token_logprobs": [triple(t, v) for t, (v, _) in zip(seq.token_ids, seq.logprobs)],
        "output_top_logprobs": [tops(top) for _, top in seq.logprobs],
    }


def _item(
    req: TokenizedGenerateReqInput,
    seq: SeqResult,
    start: float,
    lp: _LogprobRequest,
    tokenizer: Any,
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
    if lp.wanted:
        meta |= _logprob_meta(req, seq, lp, tokenizer)
    return {"text": seq.text, "output_ids": seq.token_ids, "meta_info": meta}


@router.post("/generate")
async def generate(request: Request) -> Any:
    require_kind(request, embedding=False)
    tm = tm_of(request)
    body = await request.json()
    reqs, batch, lp = _parse_generate(body, tm.tokenizer, tm.new_rid)
    for i, r in enumerate(reqs):
        validate(tm, r.input_ids, r.sampling_params, f"prompt {i}: " if batch else "")
    admit(tm, len(reqs))
    start = time.perf_counter()
    if body.get("stream"):
        return StreamingResponse(
            _stream(tm, reqs, start, lp), media_type="text/event-stream", headers=SSE_HEADERS
        )

    async def run_one(req: TokenizedGenerateReqInput) -> list[dict]:
        outs = await gather_outputs(tm.generate(req))
        n = 1 if req.prefill_only else req.sampling_params.n
        seqs = {i: SeqResult(i) for i in range(n)}
        for out in outs:
            seqs[out.index].add(out)
        return [_item(req, s, start, lp, tm.tokenizer) for s in seqs.values()]

    async def run_all() -> list[list[dict]]:
        return await asyncio.gather(*(run_one(r) for r in reqs))

    results = await until_disconnect(request, run_all())
    flat = [item for per_prompt in results for item in per_prompt]
    return JSONResponse(flat if batch or len(flat) > 1 else flat[0])


async def _stream(
    tm: Any, reqs: list[TokenizedGenerateReqInput], start: float, lp: _LogprobRequest
) -> AsyncIterator[str]:
    """SSE: each chunk carries one sequence's text so far (SGLang's shape), then [DONE]."""
    seqs: dict[tuple[int, int], SeqResult] = {}
    try:
        async for k, out in merge_streams(tm, reqs):
            seq = seqs.setdefault((k, out.index), SeqResult(out.index))
            seq.add(out)
            yield sse(_item(reqs[k], seq, start, lp, tm.tokenizer))
    except APIError as e:  # the stream has begun: the error is its last event
        yield sse(error_payload(e.message, e.status))
    yield SSE_DONE
