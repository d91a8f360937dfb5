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
    gather_outputs,
    make_sampling_params,
    merge_streams,
    require_kind,
    sse,
    sse_with_errors,
    submit,
    tm_of,
    tokenize_prompt,
    until_disconnect,
    validate,
)
from lmprog.runtime.entrypoints.errors import APIError
from lmprog.runtime.managers.io_struct import SeqOutput, TokenizedGenerateReqInput
from lmprog.runtime.managers.tokenizer_manager import RequestFailedError, SchedulerDiedError
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
        return [out async for out in tm.generate(probe)]

    try:
        await asyncio.wait_for(one(), HEALTH_GENERATE_TIMEOUT)
    except (TimeoutError, RequestFailedError, SchedulerDiedError) as e:
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
    tm = tm_of(request)
    info = await tm.get_server_info()
    args, kv = request.app.state.args, info.kv
    return {
        "server_args": {k: v for k, v in vars(args).items() if k != "api_key"},
        "kv_cache": kv,
        "scheduler": info.stats,
        "max_total_tokens": request.app.state.model_info.max_total_tokens,
        "sequences_in_flight": tm.sequences_in_flight,
        "attention_backend": request.app.state.model_info.attention_backend,
        "cpu_path": request.app.state.model_info.cpu_path,
        # SGLang's names for the same figures, for its clients and tools.
        "max_total_num_tokens": kv["total"],
        "available_size": kv["free"],
        "evictable_size": kv["evictable"],
        "protected_size": kv["protected"],
        "req_pool_size": args.max_running_requests,
        "req_pool_free": kv["free_request_slots"],
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
    """Aborts one request by `rid`, or every request in flight with `abort_all: true` or an
    empty `rid` (SGLang's semantics)."""
    body = await request.json()
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object with rid or abort_all")
    rid, abort_all = body.get("rid"), body.get("abort_all", False)
    if not isinstance(abort_all, bool):
        raise APIError(400, f"abort_all must be a bool, got {abort_all!r}", "abort_all")
    tm = tm_of(request)
    if abort_all or rid == "":
        return {"success": True, "aborted": tm.abort_all()}
    if not isinstance(rid, str):
        raise APIError(400, "rid must be the request id (a string), or give abort_all", "rid")
    return {"success": tm.abort(rid)}


@router.post("/tokenize")
async def tokenize(request: Request) -> dict:
    body = await request.json()
    text = body.get("text", body.get("prompt")) if isinstance(body, dict) else None
    if not isinstance(text, str):
        raise APIError(400, "text must be a string", "text")
    add_special = bool(body.get("add_special_tokens", True))
    ids = await tm_of(request).tokenize(text, add_special, within_context=False)
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
    return {"text": await asyncio.to_thread(tm_of(request).tokenizer.decode, ids)}


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
    require_kind(request, embedding=False)
    tm = tm_of(request)
    body = await request.json()
    reqs, batch, lp, given = await _parse_generate(body, tm)
    prompt_param = "text" if body.get("input_ids") is None else "input_ids"
    for i, r in enumerate(reqs):
        where = f"prompt {i}: " if batch else ""
        validate(tm, r.input_ids, r.sampling_params, where, prompt_param, given)
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
