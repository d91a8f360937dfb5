"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (streaming too)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from lmprog.runtime.entrypoints.chat_output import ChoiceParser, reasoning_for
from lmprog.runtime.entrypoints.chat_prompt import render_chat
from lmprog.runtime.entrypoints.chat_tools import ToolPlan, explain_grammar_error, plan_tools
from lmprog.runtime.entrypoints.common import (
    SSE_DONE,
    SSE_HEADERS,
    check_model,
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
from lmprog.runtime.entrypoints.openai_protocol import ChatCompletionRequest, CompletionRequest
from lmprog.runtime.entrypoints.seq_result import SeqResult
from lmprog.runtime.managers.io_struct import SeqOutput, TokenizedGenerateReqInput
from lmprog.runtime.managers.tokenizer_manager import RequestState
from lmprog.runtime.managers.validation import ContextLengthError
from lmprog.runtime.models.pooling_task import PoolingTask

router = APIRouter(prefix="/v1")


def _finish(out: SeqOutput | None) -> str | None:
    return None if out is None or out.finish_reason is None else out.finish_reason.kind


def _usage(seqs: list[SeqResult], prompt_tokens: int, cached: int) -> dict:
    completion = sum(len(s.token_ids) for s in seqs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


# ---- models ---------------------------------------------------------------------------------
def _task_name(task: PoolingTask | None) -> str:
    """generate, or a pooling model's kind (embed, classify, token_classify)."""
    return "generate" if task is None else task.kind


@router.get("/models")
async def models(request: Request) -> dict:
    args = request.app.state.args
    return {
        "object": "list",
        "data": [
            {
                "id": args.model_name,
                "object": "model",
                "created": 0,
                "owned_by": "lmprog",
                "root": args.model_path,
                "max_model_len": request.app.state.model_info.context_len,
                "task": _task_name(request.app.state.model_info.pooling_task),
            }
        ],
    }


# ---- completions ----------------------------------------------------------------------------
async def _completion_prompts(
    req: CompletionRequest, tm: Any
) -> list[tuple[list[int], str | None]]:
    """(token ids, text) per prompt; the text of token-id prompts is None until they are
    validated (an id outside the vocabulary cannot be decoded)."""
    p = req.prompt
    if isinstance(p, str):
        return [(await tokenize_prompt(tm, p), p)]
    if p and all(isinstance(x, int) for x in p):
        return [(list(p), None)]
    if p and all(isinstance(x, str) for x in p):
        return [(await tokenize_prompt(tm, x), x) for x in p]
    if p and all(isinstance(x, list) for x in p):
        return [(list(x), None) for x in p]
    raise APIError(
        400,
        "prompt must be a string, a list of strings, token ids, or lists of token ids",
        "prompt",
    )


def _completion_logprobs(
    token_ids: list[int],
    logprobs: list[tuple[float | None, dict[int, float]]],
    tokenizer: Any,
    offset: int = 0,
) -> dict:
    """The legacy completions logprobs object; `offset` is where the first token's text
    starts in the choice's text (after what earlier chunks sent)."""
    tokens = [tokenizer.decode([t]) for t in token_ids]
    offsets, pos = [], offset
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for lp, _ in logprobs],
        "top_logprobs": [
            None if lp is None else {tokenizer.decode([k]): v for k, v in top.items()}
            for lp, top in logprobs
        ],
        "text_offset": offsets,
    }


async def _completion_requests(
    req: CompletionRequest, tm: Any, rid: str
) -> list[TokenizedGenerateReqInput]:
    """One request per prompt. `max_tokens: 0` only computes (and caches) the prompt, which
    with echo and logprobs scores it; echo with logprobs asks for prompt logprobs."""
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise APIError(
            400,
            f"best_of {req.best_of} is not supported: it may only equal n ({req.n or 1}); "
            "ask for n completions and rank them yourself",
            "best_of",
        )
    values = req.sampling_values() | {"logprobs": req.logprobs}
    prefill_only = req.max_tokens == 0
    if prefill_only:
        if not req.echo:
            raise APIError(
                400,
                "max_tokens 0 generates nothing: it is only meaningful with echo (scoring the "
                "prompt); give max_tokens >= 1",
                "max_tokens",
            )
        if req.n not in (None, 1):
            raise APIError(
                400, f"max_tokens 0 computes the prompt only; n must be 1, got {req.n}", "n"
            )
        values["max_tokens"] = 1
    if req.echo and req.logprobs is not None:
        values["prompt_logprobs"] = req.logprobs
    params = make_sampling_params(values)
    prompts = await _completion_prompts(req, tm)
    for i, (ids, _) in enumerate(prompts):
        validate(tm, ids, params, f"prompt {i}: " if len(prompts) > 1 else "")
    texts = [
        text if text is not None else await asyncio.to_thread(tm.tokenizer.decode, ids)
        for ids, text in prompts
    ]
    return [
        TokenizedGenerateReqInput(f"{rid}-{k}", ids, params, text, prefill_only=prefill_only)
        for k, ((ids, _), text) in enumerate(zip(prompts, texts))
    ]


def _echoed(gen: TokenizedGenerateReqInput, seq: SeqResult) -> tuple[list[int], list]:
    """Prompt then completion tokens, with their logprobs, for echo with logprobs."""
    return gen.input_ids + seq.token_ids, seq.input_logprobs + seq.logprobs


@router.post("/completions")
async def completions(req: CompletionRequest, request: Request) -> Any:
    model = check_model(request, req.model)
    require_call(request, "generate")
    tm = tm_of(request)
    rid = f"cmpl-{uuid.uuid4().hex}"
    gens = await _completion_requests(req, tm, rid)
    states = submit(tm, gens, stream=req.stream)
    n = 1 if gens[0].prefill_only else gens[0].sampling_params.n
    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse_response(_stream_completion(tm, gens, states, n, head, req, include_usage))

    async def run_one(state: RequestState) -> list[SeqResult]:
        outs = await gather_outputs(tm, state)
        seqs = [SeqResult(j) for j in range(n)]
        for out in outs:
            seqs[out.index].add(out)
        return seqs

    async def run_all() -> list[list[SeqResult]]:
        return await asyncio.gather(*(run_one(st) for st in states))

    results = await until_disconnect(request, run_all())
    choices, prompt_tokens, cached = [], 0, 0
    for i, (gen, seqs) in enumerate(zip(gens, results)):
        prompt_tokens += len(gen.input_ids)
        cached += seqs[0].last.cached_tokens if seqs[0].last else 0
        for j, seq in enumerate(seqs):
            logprobs = None
            if req.logprobs is not None:
                ids, lps = _echoed(gen, seq) if req.echo else (seq.token_ids, seq.logprobs)
                logprobs = _completion_logprobs(ids, lps, tm.tokenizer)
            choices.append(
                {
                    "index": i * n + j,
                    "text": (gen.input_text if req.echo else "") + seq.text,
                    "logprobs": logprobs,
                    "finish_reason": _finish(seq.last),
                }
            )
    all_seqs = [s for seqs in results for s in seqs]
    return head | {"choices": choices, "usage": _usage(all_seqs, prompt_tokens, cached)}


async def _stream_completion(
    tm: Any,
    gens: list[TokenizedGenerateReqInput],
    states: list[RequestState],
    n: int,
    head: dict,
    req: CompletionRequest,
    include_usage: bool,
) -> AsyncIterator[str]:
    seqs: dict[int, SeqResult] = {}
    sent: dict[int, int] = {}  # characters of text streamed per choice
    prompt_tokens, cached = 0, 0
    async for i, out in merge_streams(tm, states):
        idx = i * n + out.index
        seq = seqs.setdefault(idx, SeqResult(idx))
        first = not seq.last
        seq.add(out)
        text, ids, lps = out.text, out.token_ids, out.logprobs or []
        if first and req.echo:
            text = gens[i].input_text + text
            ids, lps = gens[i].input_ids + ids, (out.input_logprobs or []) + lps
        if out.finish_reason is not None and out.index == 0:
            prompt_tokens += out.prompt_tokens
            cached += out.cached_tokens
        logprobs = None
        if req.logprobs is not None:
            logprobs = _completion_logprobs(ids, lps, tm.tokenizer, sent.get(idx, 0))
        sent[idx] = sent.get(idx, 0) + len(text)
        chunk = {"index": idx, "text": text, "logprobs": logprobs, "finish_reason": _finish(out)}
        yield sse(head | {"choices": [chunk]})
    if include_usage:
        yield sse(
            head | {"choices": [], "usage": _usage(list(seqs.values()), prompt_tokens, cached)}
        )
    yield SSE_DONE


def _sse_response(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        sse_with_errors(gen), media_type="text/event-stream", headers=SSE_HEADERS
    )


# ---- chat -----------------------------------------------------------------------------------
async def _chat_prompt(req: ChatCompletionRequest, tm: Any, plan: ToolPlan) -> list[int]:
    """Token ids of the conversation, rendered and tokenized off the event loop."""
    try:
        tm.check_length_bound(
            "".join(m.content for m in req.messages if isinstance(m.content, str))
        )
    except ContextLengthError as e:
        raise APIError(400, str(e), "messages", code="context_length_exceeded") from None
    text = await asyncio.to_thread(render_chat, req, tm.tokenizer, plan)
    return await tm.tokenize(text, add_special_tokens=False, within_context=False)


def _chat_logprobs(seq_ids: list[int], logprobs: list, tokenizer: Any) -> dict:
    content = []
    for tid, (lp, top) in zip(seq_ids, logprobs):
        tok = tokenizer.decode([tid])
        content.append(
            {
                "token": tok,
                "logprob": lp,
                "bytes": list(tok.encode()),
                "top_logprobs": [
                    {"token": (t := tokenizer.decode([k])), "logprob": v, "bytes": list(t.encode())}
                    for k, v in top.items()
                ],
            }
        )
    return {"content": content}


@router.post("/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
    model = check_model(request, req.model)
    require_call(request, "generate")
    tm = tm_of(request)
    args = request.app.state.args
    plan = plan_tools(req, args.tool_call_parser)
    values = req.sampling_values() | plan.sampling_values(req)
    max_tokens_name = "max_tokens"
    if req.max_completion_tokens is not None:
        values["max_tokens"] = req.max_completion_tokens
        max_tokens_name = "max_completion_tokens"
    if req.logprobs:
        values["logprobs"] = req.top_logprobs or 0
    elif req.top_logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    params = make_sampling_params(values, names={"max_tokens": max_tokens_name})
    ids = await _chat_prompt(req, tm, plan)
    validate(tm, ids, params, "", "messages", names={"max_tokens": max_tokens_name})
    reasoning = reasoning_for(args.reasoning_parser, req, plan)

    def parser() -> ChoiceParser | None:
        """Each choice's parser; None when replies are plain text."""
        if reasoning is None and plan.parser is None:
            return None
        return ChoiceParser(reasoning, plan.parser)

    rid = f"chatcmpl-{uuid.uuid4().hex}"
    (state,) = submit(tm, [TokenizedGenerateReqInput(rid, ids, params)], stream=req.stream)
    head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = _stream_chat(tm, state, ids, params, head, req, plan, parser, include_usage)
        return _sse_response(chunks)
    try:
        outs = await until_disconnect(request, gather_outputs(tm, state))
    except APIError as e:
        raise explain_grammar_error(e, plan) from None
    seqs = [SeqResult(j) for j in range(params.n)]
    for out in outs:
        seqs[out.index].add(out)
    choices = []
    for s in seqs:
        p = parser()
        choices.append(
            {
                "index": s.index,
                "message": p.message(s.text) if p else {"role": "assistant", "content": s.text},
                "logprobs": _chat_logprobs(s.token_ids, s.logprobs, tm.tokenizer)
                if req.logprobs
                else None,
                "finish_reason": p.finish_reason(_finish(s.last)) if p else _finish(s.last),
            }
        )
    cached = seqs[0].last.cached_tokens if seqs[0].last else 0
    return head | {"choices": choices, "usage": _usage(seqs, len(ids), cached)}


async def _stream_chat(
    tm: Any,
    state: RequestState,
    ids: list[int],
    params: Any,
    head: dict,
    req: ChatCompletionRequest,
    plan: ToolPlan,
    parser: Callable[[], ChoiceParser | None],
    include_usage: bool,
) -> AsyncIterator[str]:
    """Chunks as OpenAI streams them: each choice's role first (content null when a tool call
    is enforced), then its deltas; with parsers, a chunk goes out when it has something."""
    head = head | {"object": "chat.completion.chunk"}
    seqs: dict[int, SeqResult] = {}
    parsers = {j: parser() for j in range(params.n)}
    cached = 0
    for j in range(params.n):
        role = {
            "index": j,
            "delta": {"role": "assistant", "content": None if plan.forced is not None else ""},
            "logprobs": None,
            "finish_reason": None,
        }
        yield sse(head | {"choices": [role]})
    try:
        async for _, out in merge_streams(tm, [state]):
            seq = seqs.setdefault(out.index, SeqResult(out.index))
            before = len(seq.logprobs)
            seq.add(out)
            cached = out.cached_tokens
            logprobs = None
            if req.logprobs:
                logprobs = _chat_logprobs(out.token_ids, seq.logprobs[before:], tm.tokenizer)
            reason, p = _finish(out), parsers[out.index]
            if p is None:
                delta = {"content": out.text} if out.text or reason is None else {}
            else:
                delta = p.feed(out.text, last=reason is not None)
                reason = p.finish_reason(reason)
                if not delta and logprobs is None and reason is None:
                    continue
            chunk = {
                "index": out.index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": reason,
            }
            yield sse(head | {"choices": [chunk]})
    except APIError as e:
        raise explain_grammar_error(e, plan) from None
    if include_usage:
        yield sse(head | {"choices": [], "usage": _usage(list(seqs.values()), len(ids), cached)})
    yield SSE_DONE
