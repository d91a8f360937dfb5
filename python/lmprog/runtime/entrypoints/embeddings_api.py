"""Embedding routes: OpenAI's POST /v1/embeddings and SGLang's native POST /encode.

An embedding request is a prompt-only request (pooled_requests.py): the scheduler pools the
model's hidden states into one vector per input (normalized when the model's pooling says so).
"""

from __future__ import annotations

import base64
import math
import struct
import uuid
from typing import Any

from fastapi import APIRouter, Request

from lmprog.runtime.entrypoints.common import check_model, require_call, tm_of
from lmprog.runtime.entrypoints.errors import APIError
from lmprog.runtime.entrypoints.openai_protocol import EmbeddingRequest
from lmprog.runtime.entrypoints.pooled_requests import read_inputs, run_pooled, truncate

router = APIRouter()


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
    require_call(request, "embed")
    info = request.app.state.model_info
    if req.dimensions is not None and not 1 <= req.dimensions <= info.embedding_dim:
        raise APIError(
            400,
            f"dimensions must be in [1, {info.embedding_dim}] (the model's embedding size), "
            f"got {req.dimensions}",
            "dimensions",
        )
    ids, _ = await read_inputs(req.input, tm_of(request), "input")
    ids = truncate(ids, req.truncate_prompt_tokens)
    vectors = await run_pooled(request, ids, f"embd-{uuid.uuid4().hex}")
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
    require_call(request, "embed")
    body = await request.json()
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    field = "text" if "text" in body else "input_ids"
    if field not in body:
        raise APIError(400, "give text or input_ids", "text")
    tm = tm_of(request)
    ids, batch = await read_inputs(body[field], tm, field)
    ids = truncate(ids, body.get("truncate_prompt_tokens"))
    rid = f"encode-{uuid.uuid4().hex}"
    vectors = await run_pooled(request, ids, rid, field=field)
    items = [
        {"embedding": v, "meta_info": {"id": f"{rid}-{k}", "prompt_tokens": len(x)}}
        for k, (v, x) in enumerate(zip(vectors, ids))
    ]
    return items if batch else items[0]
