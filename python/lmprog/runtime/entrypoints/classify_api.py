"""Routes of classifiers and reward models: vLLM's POST /classify (also /v1/classify, SGLang's
path) and POST /pooling, which returns the model's raw output (`LLM.reward`'s data)."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from lmprog.runtime.entrypoints.common import check_model, require_call, tm_of
from lmprog.runtime.entrypoints.pooled_requests import read_inputs, run_pooled, truncate
from lmprog.runtime.entrypoints.pooling_protocol import ClassifyRequest, PoolingRequest
from lmprog.runtime.models.pooling_task import class_probs

router = APIRouter()


def _usage(ids: list[list[int]]) -> dict:
    tokens = sum(len(x) for x in ids)
    return {
        "prompt_tokens": tokens,
        "total_tokens": tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }


@router.post("/classify")
@router.post("/v1/classify")
async def classify(req: ClassifyRequest, request: Request) -> dict:
    model = check_model(request, req.model)
    require_call(request, "classify")
    ids, _ = await read_inputs(req.input, tm_of(request), "input")
    ids = truncate(ids, req.truncate_prompt_tokens)
    rid = f"classify-{uuid.uuid4().hex}"
    labels = request.app.state.model_info.pooling_task.labels
    data = []
    for i, logits in enumerate(await run_pooled(request, ids, rid)):
        probs = class_probs(logits)
        best = max(range(len(probs)), key=probs.__getitem__)
        data.append({"index": i, "label": labels[best], "probs": probs, "num_classes": len(probs)})
    return {
        "id": rid,
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": _usage(ids),
    }


@router.post("/pooling")
async def pooling(req: PoolingRequest, request: Request) -> dict:
    """The raw logits per input: [num_labels] (a reward model's one label: the reward), or
    [tokens][num_labels] for a token classifier."""
    model = check_model(request, req.model)
    require_call(request, "reward")
    ids, _ = await read_inputs(req.input, tm_of(request), "input")
    ids = truncate(ids, req.truncate_prompt_tokens)
    rid = f"pool-{uuid.uuid4().hex}"
    outputs = await run_pooled(request, ids, rid)
    return {
        "id": rid,
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": [{"index": i, "object": "pooling", "data": out} for i, out in enumerate(outputs)],
        "usage": _usage(ids),
    }
