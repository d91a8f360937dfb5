"""What the native and OpenAI routes share: sampling parameters from JSON, SSE framing, and
waiting for a request while watching for the client to go away."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request

from lmprog.runtime.entrypoints.errors import APIError, api_error_payload, error_payload
from lmprog.runtime.managers.io_struct import SeqOutput, TokenizedGenerateReqInput
from lmprog.runtime.managers.tokenizer_manager import (
    DuplicateRequestError,
    QueueFullError,
    RequestFailedError,
    RequestState,
    SchedulerDiedError,
    TokenizerManager,
)
from lmprog.runtime.managers.validation import ContextLengthError
from lmprog.runtime.models.pooling_task import refusal, serves
from lmprog.runtime.sampling.param_error import ParamError
from lmprog.runtime.sampling.sampling_params import SamplingParams

T = TypeVar("T")
logger = logging.getLogger(__name__)
# output_kind is how the Python streaming engine yields outputs; HTTP streams are chosen by
# the route's own `stream` flag, so it is not a request field.
SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams)) - {"output_kind"}
DISCONNECT_POLL = 0.5


def make_sampling_params(
    values: dict[str, Any], field_prefix: str = "", names: dict[str, str] | None = None
) -> SamplingParams:
    """SamplingParams from JSON values (None means the default); a bad name or value is a
    400 whose `param` is the field, as the route calls it (`names`: SamplingParams' name ->
    the route's, e.g. max_tokens -> max_new_tokens)."""
    unknown = sorted(set(values) - SAMPLING_FIELDS)
    if unknown:
        raise APIError(
            400, f"unknown sampling parameter(s) {unknown}", f"{field_prefix}{unknown[0]}"
        )
    try:
        return SamplingParams(**{k: v for k, v in values.items() if v is not None})
    except (TypeError, ValueError) as e:
        raise APIError(400, str(e), _route_param(e, field_prefix, names)) from None


def _route_param(e: Exception, prefix: str, names: dict[str, str] | None) -> str | None:
    param = e.param if isinstance(e, ParamError) else None
    if param is None:
        return None
    return prefix + (names or {}).get(param, param)


def tm_of(request: Request) -> TokenizerManager:
    return request.app.state.tm


# SGLang's examples call its OpenAI routes with model="default": the served model, whatever its
# name, so those programs run unchanged.
DEFAULT_MODEL_ALIAS = "default"


def check_model(request: Request, model: str | None) -> str:
    """The served model's name; 404 when a request names another (`default` names it too)."""
    served = request.app.state.args.model_name
    if model is not None and model not in (served, DEFAULT_MODEL_ALIAS):
        raise APIError(
            404,
            f"The model '{model}' does not exist: this server serves '{served}'",
            code="model_not_found",
        )
    return served


def require_call(request: Request, call: str) -> None:
    """400 when the served model does not answer a route's call (generate, embed, classify,
    score, reward), saying what it is and which routes it answers (models/pooling_task.py)."""
    task = request.app.state.model_info.pooling_task
    if not serves(task, call):
        name = request.app.state.args.model_name
        raise APIError(400, refusal(task, call, name, routes=True))


def submit(
    tm: TokenizerManager, reqs: list[TokenizedGenerateReqInput], stream: bool = False
) -> list[RequestState]:
    """Admits and sends requests (all or none): 503 + Retry-After when the queue is full, 503
    when the scheduler is gone, 400 for a request id already in flight."""
    try:
        return tm.submit(reqs, stream=stream)
    except QueueFullError as e:
        raise APIError(503, str(e), headers={"Retry-After": "1"}) from None
    except SchedulerDiedError as e:
        raise APIError(503, str(e)) from None
    except DuplicateRequestError as e:
        raise APIError(400, str(e), "rid") from None


async def tokenize_prompt(tm: TokenizerManager, text: str, param: str = "prompt") -> list[int]:
    """A prompt's token ids (off the event loop); one that cannot fit the context is a 400
    `context_length_exceeded` at once, before it is tokenized."""
    try:
        return await tm.tokenize(text)
    except ContextLengthError as e:
        raise APIError(400, str(e), param, code="context_length_exceeded") from None


def validate(
    tm: TokenizerManager,
    input_ids: list[int],
    params: SamplingParams,
    where: str,
    prompt_param: str = "prompt",
    names: dict[str, str] | None = None,
) -> None:
    """400 naming the field; a prompt (or prompt + max_tokens) beyond the context has code
    `context_length_exceeded` and `prompt_param` as its param (OpenAI's chat says messages)."""
    try:
        tm.validate(input_ids, params)
    except ContextLengthError as e:
        raise APIError(400, f"{where}{e}", prompt_param, code="context_length_exceeded") from None
    except ValueError as e:
        param = _route_param(e, "", names)
        if param == "prompt":
            param = prompt_param
        raise APIError(400, f"{where}{e}", param) from None


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


def _as_api_error(e: Exception) -> APIError:
    if isinstance(e, RequestFailedError):
        return APIError(e.status, e.message)
    return APIError(503, str(e))  # SchedulerDiedError


async def gather_outputs(tm: TokenizerManager, state: RequestState) -> list[SeqOutput]:
    """Every report of one submitted request, in order (APIError if it failed)."""
    try:
        return [item async for item in tm.outputs(state)]
    except (RequestFailedError, SchedulerDiedError) as e:
        raise _as_api_error(e) from None


async def merge_streams(
    tm: TokenizerManager, states: list[RequestState]
) -> AsyncIterator[tuple[int, SeqOutput]]:
    """Streams several submitted requests; yields (request index, SeqOutput) as reports
    arrive. A failed request raises APIError; leaving early aborts every request still
    running."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, state: RequestState) -> None:
        try:
            async for out in tm.outputs(state):
                await queue.put((k, out))
        except (RequestFailedError, SchedulerDiedError) as e:
            await queue.put((k, e))
        finally:
            await queue.put((k, None))

    tasks = [asyncio.ensure_future(pump(k, state)) for k, state in enumerate(states)]
    running = len(tasks)
    try:
        while running:
            k, out = await queue.get()
            if out is None:
                running -= 1
            elif isinstance(out, Exception):
                raise _as_api_error(out)
            else:
                yield k, out
    finally:
        for task in tasks:
            task.cancel()
        for state in states:
            if not state.ended:
                tm.abort(state.rid)  # its pump may not have started: abort it here


async def sse_with_errors(gen: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream's events; once it has begun, an error is its last event (then [DONE]): the
    request's own (APIError), or a fault of the server while streaming (500, logged)."""
    try:
        async for chunk in gen:
            yield chunk
    except APIError as e:
        yield sse(api_error_payload(e))
        yield SSE_DONE
    except Exception as e:  # the client hears of it; the server goes on
        logger.exception("a stream failed")
        message = f"internal error while streaming: {type(e).__name__}: {e}"
        yield sse(error_payload(message, 500))
        yield SSE_DONE


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
