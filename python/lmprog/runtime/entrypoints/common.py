"""What the native and OpenAI routes share: sampling parameters from JSON, SSE framing, and
waiting for a request while watching for the client to go away."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request

from lmprog.runtime.entrypoints.errors import APIError
from lmprog.runtime.managers.io_struct import TokenizedGenerateReqInput
from lmprog.runtime.managers.tokenizer_manager import (
    QueueFullError,
    SchedulerDiedError,
    TokenizerManager,
)
from lmprog.runtime.sampling.sampling_params import SamplingParams

T = TypeVar("T")
SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
DISCONNECT_POLL = 0.5


def make_sampling_params(values: dict[str, Any], field_prefix: str = "") -> SamplingParams:
    """SamplingParams from JSON values (None means the default); a bad name or value is a
    400 naming the field."""
    unknown = sorted(set(values) - SAMPLING_FIELDS)
    if unknown:
        raise APIError(
            400, f"unknown sampling parameter(s) {unknown}", f"{field_prefix}{unknown[0]}"
        )
    try:
        return SamplingParams(**{k: v for k, v in values.items() if v is not None})
    except (TypeError, ValueError) as e:
        raise APIError(400, str(e)) from None


def tm_of(request: Request) -> TokenizerManager:
    return request.app.state.tm


def check_model(request: Request, model: str | None) -> str:
    """The served model's name; 404 when a request names another."""
    served = request.app.state.args.model_name
    if model is not None and model != served:
        raise APIError(
            404, f"model '{model}' is not served here; this server serves '{served}'", "model"
        )
    return served


def require_kind(request: Request, embedding: bool) -> None:
    """400 when a route is for the other kind of server (generation vs embeddings)."""
    info = request.app.state.model_info
    if info.is_embedding == embedding:
        return
    name = request.app.state.args.model_name
    if info.is_embedding:
        message = (
            f"this server serves the embedding model '{name}': use /v1/embeddings or /encode "
            "(generation routes are not available)"
        )
    else:
        message = (
            f"this server serves the generation model '{name}': embeddings need an embedding "
            "server (an encoder model, or a decoder started with --is-embedding)"
        )
    raise APIError(400, message)


def admit(tm: TokenizerManager, requests: int) -> None:
    """Refuses new work when the queue is full or the scheduler is gone (503 + Retry-After)."""
    try:
        tm.check_capacity(requests)
    except QueueFullError as e:
        raise APIError(503, str(e), headers={"Retry-After": "1"}) from None
    except SchedulerDiedError as e:
        raise APIError(503, str(e)) from None


def validate(
    tm: TokenizerManager, input_ids: list[int], params: SamplingParams, where: str
) -> None:
    try:
        tm.validate(input_ids, params)
    except ValueError as e:
        raise APIError(400, f"{where}{e}") from None


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`; if the client disconnects first, cancels it (which aborts its requests)
    and raises APIError 499-style (the response goes nowhere)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(400, "client disconnected")
    finally:
        if not task.done():
            task.cancel()


async def gather_outputs(gen: AsyncIterator[Any]) -> list[Any]:
    """Every report of one request, in order (raises what the generator raises)."""
    try:
        return [item async for item in gen]
    except SchedulerDiedError as e:
        raise APIError(503, str(e)) from None
    except ValueError as e:
        raise APIError(400, str(e)) from None


async def merge_streams(
    tm: TokenizerManager, reqs: list[TokenizedGenerateReqInput]
) -> AsyncIterator[tuple[int, Any]]:
    """Streams several requests; yields (request index, SeqOutput) as reports arrive. A
    refused request raises APIError (400, or 503 when the scheduler is gone); leaving early
    aborts every request still running."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, req: TokenizedGenerateReqInput) -> None:
        try:
            async for out in tm.generate(dataclasses.replace(req, stream=True)):
                await queue.put((k, out))
        except (ValueError, SchedulerDiedError) as e:
            await queue.put((k, e))
        finally:
            await queue.put((k, None))

    tasks = [asyncio.ensure_future(pump(k, req)) for k, req in enumerate(reqs)]
    running = len(tasks)
    try:
        while running:
            k, out = await queue.get()
            if out is None:
                running -= 1
            elif isinstance(out, SchedulerDiedError):
                raise APIError(503, str(out))
            elif isinstance(out, ValueError):
                raise APIError(400, str(out))
            else:
                yield k, out
    finally:
        for task in tasks:
            task.cancel()


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
