"""Embedding routes: OpenAI's POST /v1/embeddings and SGLang's native POST /encode.

An embedding request is a prompt-only request: the scheduler pools the model's hidden states
into one vector per input (normalized when the model's pooling says so).
"""

from __future__ import annotations

import asyncio
import base64
import math
import struct
import uuid
from typing import Any

from fastapi import APIRouter, Request

from lmprog.runtime.entrypoints.common import (
    check_model,
    gather_outputs,
    require_kind,
    submit,
    tm_of,
    until_disconnect,
    validate,
)
from lmprog.runtime.entrypoints.errors import APIError
from lmprog.runtime.entrypoints.openai_protocol import EmbeddingRequest
from lmprog.runtime.managers.io_struct import TokenizedGenerateReqInput
from lmprog.runtime.managers.tokenizer_manager import RequestState
from lmprog.runtime.managers.validation import truncate_prompt
from lmprog.runtime.sampling.sampling_params import SamplingParams

router = APIRouter()


async def _inputs(raw: Any, tm: Any, field: str) -> tuple[list[list[int]], bool]:
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


def _truncate(ids: list[list[int]], keep: int | None) -> list[list[int]]:
    return ids if keep is None else [truncate_prompt(x, keep) for x in ids]


async def _embed(request: Request, ids: list[list[int]], rid: str) -> list[list[float]]:
    """Embeds every input (validated first: a bad one sends nothing)."""
    tm = tm_of(request)
    params = SamplingParams(max_tokens=1)
    batch = len(ids) > 1
    for i, x in enumerate(ids):
        validate(tm, x, params, f"input {i}: " if batch else "", "input")
    reqs = [
        TokenizedGenerateReqInput(f"{rid}-{k}", x, params, prefill_only=True)
        for k, x in enumerate(ids)
    ]
    states = submit(tm, reqs)

    async def one(state: RequestState) -> list[float]:
        outs = await gather_outputs(tm, state)
        last = outs[-1]
        if last.embedding is None:  # aborted
            raise APIError(400, last.finish_reason.message or "the request was aborted")
        return last.embedding

    async def run_all() -> list[list[float]]:
        return await asyncio.gather(*(one(st) for st in states))

    return await until_disconnect(request, run_all())


def _shorten(vector: list[float], dimensions: int | None) -> list[float]:
    """OpenAI's `dimensions`: the first d values, renormalized (Matryoshka-style)."""
    if dimensions is None:
        return vector
    head = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in head))
    return [v / norm for v in head] if norm else head


def _encode_float32(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request) -> dict:
    model = check_model(request, req.model)
    require_kind(request, embedding=True)
    info = request.app.state.model_info
    if req.dimensions is not None and not 1 <= req.dimensions <= info.embedding_dim:
        raise APIError(
            400,
            f"dimensions must be in [1, {info.embedding_dim}] (the model's embedding size), "
            f"got {req.dimensions}",
            "dimensions",
        )
    ids, _ = await _inputs(req.input, tm_of(request), "input")
    ids = _truncate(ids, req.truncate_prompt_tokens)
    vectors = await _embed(request, ids, f"embd-{uuid.uuid4().hex}")
    data = []
    for i, vector in enumerate(vectors):
        vector = _shorten(vector, req.dimensions)
        value = _encode_float32(vector) if req.encoding_format == "base64" else vector
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(len(x) for x in ids)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


@router.post("/encode")
async def encode(request: Request) -> Any:
    """SGLang's native route: {"text" | "input_ids"} -> {"embedding", "meta_info"} (a list for
    a batch)."""
    require_kind(request, embedding=True)
    body = await request.json()
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    field = "text" if "text" in body else "input_ids"
    if field not in body:
        raise APIError(400, "give text or input_ids", "text")
    tm = tm_of(request)
    ids, batch = await _inputs(body[field], tm, field)
    ids = _truncate(ids, body.get("truncate_prompt_tokens"))
    rid = f"encode-{uuid.uuid4().hex}"
    vectors = await _embed(request, ids, rid)
    items = [
        {"embedding": v, "meta_info": {"id": f"{rid}-{k}", "prompt_tokens": len(x)}}
        for k, (v, x) in enumerate(zip(vectors, ids))
    ]
    return items if batch else items[0]
