"""Native routes besides /generate (generate_api.py): health, model and server info, cache flush,
abort, tokenize and detokenize."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from lmprog.runtime.entrypoints.common import tm_of
from lmprog.runtime.entrypoints.errors import APIError
from lmprog.runtime.managers.io_struct import TokenizedGenerateReqInput
from lmprog.runtime.managers.tokenizer_manager import RequestFailedError, SchedulerDiedError
from lmprog.runtime.sampling.sampling_params import SamplingParams

router = APIRouter()
HEALTH_GENERATE_TIMEOUT = 20.0


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
        # A pooling model's kind (embed, classify, token_classify) and a classifier's labels.
        "pooling_task": info.pooling_task.kind if info.pooling_task else None,
        "labels": list(info.pooling_task.labels) if info.pooling_task else None,
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
