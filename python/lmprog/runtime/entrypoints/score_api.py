"""Scoring routes: vLLM's POST /v1/score (also /score) and the Jina / Cohere-style POST
/v1/rerank (also /rerank, /v2/rerank).

An embedding model scores a pair by the cosine of the two embeddings (a text given once for many
pairs is embedded once); a cross-encoder (a classifier with one label) reads each pair as one
input and scores it by the sigmoid of its logit (models/pooling_task.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request

from lmprog.runtime.entrypoints.common import check_model, require_call, tm_of
from lmprog.runtime.entrypoints.errors import APIError
from lmprog.runtime.entrypoints.pooled_requests import read_inputs, run_pooled, truncate
from lmprog.runtime.entrypoints.pooling_protocol import RerankRequest, ScoreRequest
from lmprog.runtime.managers.pair_inputs import encode_pair, pair_up
from lmprog.runtime.models.pooling_task import cosine, pair_score

router = APIRouter()


async def _score(
    request: Request,
    first: list[str],
    second: list[str],
    keep: int | None,
    fields: tuple[str, str],
) -> tuple[list[float], int]:
    """(a score per pair, prompt tokens computed) for the pairs first[i], second[i]."""
    if request.app.state.model_info.pooling_task.kind == "embed":
        return await _cosine_scores(request, first, second, keep, fields)
    return await _cross_encoder_scores(request, first, second, keep, fields)


async def _cosine_scores(
    request: Request, first: list[str], second: list[str], keep: int | None, fields: tuple[str, str]
) -> tuple[list[float], int]:
    one = len(set(first)) == 1  # one text against many: embed it once
    texts = [(first[:1] if one else first, fields[0]), (second, fields[1])]
    ids, names = [], []
    for items, field in texts:
        tokens, _ = await read_inputs(items, tm_of(request), field)
        ids += truncate(tokens, keep)
        names += [(field, f"{field}[{i}]") for i in range(len(items))]
    vectors = await run_pooled(request, ids, f"score-{uuid.uuid4().hex}", names=names)
    n = len(texts[0][0])
    a, b = vectors[:n] * (len(second) if one else 1), vectors[n:]
    return [cosine(x, y) for x, y in zip(a, b)], sum(len(x) for x in ids)


async def _cross_encoder_scores(
    request: Request, first: list[str], second: list[str], keep: int | None, fields: tuple[str, str]
) -> tuple[list[float], int]:
    for texts, field in ((first, fields[0]), (second, fields[1])):
        empty = next((i for i, t in enumerate(texts) if not t), None)
        if empty is not None:
            raise APIError(400, f"{field}[{empty}] is an empty string", field)
    tokenizer = tm_of(request).tokenizer

    def encode_all() -> list[tuple[list[int], list[int] | None]]:
        return [encode_pair(tokenizer, a, b, keep) for a, b in zip(first, second)]

    try:
        pairs = await asyncio.to_thread(encode_all)
    except ValueError as e:
        raise APIError(400, str(e), "truncate_prompt_tokens") from None
    ids = [x for x, _ in pairs]
    names = [(fields[1], f"pair {i}") for i in range(len(pairs))]
    rid = f"score-{uuid.uuid4().hex}"
    logits = await run_pooled(request, ids, rid, names=names, token_types=[t for _, t in pairs])
    return [pair_score(x) for x in logits], sum(len(x) for x in ids)


def _texts(value: str | list[str], field: str) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise APIError(400, f"{field} must be a string or a non-empty list of strings", field)
    return texts


@router.post("/v1/score")
@router.post("/score")
async def score(req: ScoreRequest, request: Request) -> dict:
    """text_1 and text_2 strings or lists: one pair, one text against many, or pairwise."""
    model = check_model(request, req.model)
    require_call(request, "score")
    try:
        first, second = pair_up(
            _texts(req.text_1, "text_1"), _texts(req.text_2, "text_2"), ("text_1", "text_2")
        )
    except ValueError as e:
        raise APIError(400, str(e), "text_2") from None
    scores, tokens = await _score(
        request, first, second, req.truncate_prompt_tokens, ("text_1", "text_2")
    )
    return {
        "id": f"score-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
    }


@router.post("/v1/rerank")
@router.post("/rerank")
@router.post("/v2/rerank")
async def rerank(req: RerankRequest, request: Request) -> dict:
    """The documents by relevance to the query, most relevant first; `top_n` keeps the best."""
    model = check_model(request, req.model)
    require_call(request, "score")
    if req.top_n is not None and req.top_n < 0:
        raise APIError(400, f"top_n must be >= 0 (0: every document), got {req.top_n}", "top_n")
    docs = _texts(req.documents, "documents")
    scores, tokens = await _score(
        request, [req.query] * len(docs), docs, req.truncate_prompt_tokens, ("query", "documents")
    )
    order = sorted(range(len(docs)), key=lambda i: -scores[i])[: req.top_n or len(docs)]
    return {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": model,
        "usage": {"total_tokens": tokens},
        "results": [
            {"index": i, "document": {"text": docs[i]}, "relevance_score": scores[i]} for i in order
        ],
    }
