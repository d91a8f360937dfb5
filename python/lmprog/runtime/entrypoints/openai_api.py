"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (streaming too)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from lmprog.runtime.entrypoints.common import (
    SSE_DONE,
    SSE_HEADERS,
    admit,
    check_model,
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
from lmprog.runtime.entrypoints.native_api import SeqResult
from lmprog.runtime.entrypoints.openai_protocol import ChatCompletionRequest, CompletionRequest
from lmprog.runtime.managers.io_struct import SeqOutput, TokenizedGenerateReqInput

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
                "task": "embed" if request.app.state.model_info.is_embedding else "generate",
            }
        ],
    }


# ---- completions ----------------------------------------------------------------------------
def _completion_prompts(req: CompletionRequest, tokenizer: Any) -> list[tuple[list[int], str]]:
    p = req.prompt
    if isinstance(p, str):
        return [(tokenizer.encode(p), p)]
    if p and all(isinstance(x, int) for x in p):
        return [(list(p), tokenizer.decode(p))]
    if p and all(isinstance(x, str) for x in p):
        return [(tokenizer.encode(x), x) for x in p]
    if p and all(isinstance(x, list) for x in p):
        return [(list(x), tokenizer.decode(x)) for x in p]
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


def _completion_requests(
    req: CompletionRequest, tm: Any, rid: str
) -> list[TokenizedGenerateReqInput]:
    """One request per prompt. `max_tokens: 0` only computes (and caches) the prompt, which
    with echo and logprobs scores it; echo with logprobs asks for prompt logprobs."""
    values = req.sampling_values() | {"logprobs": req.logprobs}
    prefill_only = req.max_tokens == 0
    if prefill_only:
        if req.n not in (None, 1):
            raise APIError(
                400, f"max_tokens 0 computes the prompt only; n must be 1, got {req.n}", "n"
            )
        values["max_tokens"] = 1
    if req.echo and req.logprobs is not None:
        values["prompt_logprobs"] = req.logprobs
    params = make_sampling_params(values)
    prompts = _completion_prompts(req, tm.tokenizer)
    for i, (ids, _) in enumerate(prompts):
        validate(tm, ids, params, f"prompt {i}: " if len(prompts) > 1 else "")
    return [
        TokenizedGenerateReqInput(f"{rid}-{k}", ids, params, text, prefill_only=prefill_only)
        for k, (ids, text) in enumerate(prompts)
    ]


def _echoed(gen: TokenizedGenerateReqInput, seq: SeqResult) -> tuple[list[int], list]:
    """Prompt then completion tokens, with their logprobs, for echo with logprobs."""
    return gen.input_ids + seq.token_ids, seq.input_logprobs + seq.logprobs


@router.post("/completions")
async def completions(req: CompletionRequest, request: Request) -> Any:
    model = check_model(request, req.model)
    require_kind(request, embedding=False)
    tm = tm_of(request)
    rid = f"cmpl-{uuid.uuid4().hex}"
    gens = _completion_requests(req, tm, rid)
    admit(tm, len(gens))
    n = 1 if gens[0].prefill_only else gens[0].sampling_params.n
    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse_response(_stream_completion(tm, gens, n, head, req, include_usage))

    async def run_one(gen: TokenizedGenerateReqInput) -> list[SeqResult]:
        outs = await gather_outputs(tm.generate(gen))
        seqs = [SeqResult(j) for j in range(n)]
        for out in outs:
            seqs[out.index].add(out)
        return seqs

    async def run_all() -> list[list[SeqResult]]:
        return await asyncio.gather(*(run_one(g) for g in gens))

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
    n: int,
    head: dict,
    req: CompletionRequest,
    include_usage: bool,
) -> AsyncIterator[str]:
    seqs: dict[int, SeqResult] = {}
    sent: dict[int, int] = {}  # characters of text streamed per choice
    prompt_tokens, cached = 0, 0
    async for i, out in merge_streams(tm, gens):
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
    async def guarded() -> AsyncIterator[str]:
        try:
            async for chunk in gen:
                yield chunk
        except APIError as e:
            yield sse(error_payload(e.message, e.status))
            yield SSE_DONE

    return StreamingResponse(guarded(), media_type="text/event-stream", headers=SSE_HEADERS)


# ---- chat -----------------------------------------------------------------------------------
def _chat_prompt(req: ChatCompletionRequest, tokenizer: Any) -> list[int]:
    messages = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(
                        400,
                        f"messages[{i}].content: only text parts are supported, got {part.get('type')!r}",
                        f"messages.{i}.content",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        messages.append({"role": m.role, "content": content or ""})
    if not messages:
        raise APIError(400, "messages must not be empty", "messages")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


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
    require_kind(request, embedding=False)
    tm = tm_of(request)
    values = req.sampling_values()
    if req.max_completion_tokens is not None:
        values["max_tokens"] = req.max_completion_tokens
    if req.logprobs:
        values["logprobs"] = req.top_logprobs or 0
    elif req.top_logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    params = make_sampling_params(values)
    ids = _chat_prompt(req, tm.tokenizer)
    validate(tm, ids, params, "")
    admit(tm, 1)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse_response(_stream_chat(tm, ids, params, rid, head, req, include_usage))
    gen = TokenizedGenerateReqInput(rid, ids, params)
    outs = await until_disconnect(request, gather_outputs(tm.generate(gen)))
    seqs = [SeqResult(j) for j in range(params.n)]
    for out in outs:
        seqs[out.index].add(out)
    choices = [
        {
            "index": s.index,
            "message": {"role": "assistant", "content": s.text},
            "logprobs": _chat_logprobs(s.token_ids, s.logprobs, tm.tokenizer)
            if req.logprobs
            else None,
            "finish_reason": _finish(s.last),
        }
        for s in seqs
    ]
    cached = seqs[0].last.cached_tokens if seqs[0].last else 0
    return head | {"choices": choices, "usage": _usage(seqs, len(ids), cached)}


async def _stream_chat(
    tm: Any,
    ids: list[int],
    params: Any,
    rid: str,
    head: dict,
    req: ChatCompletionRequest,
    include_usage: bool,
) -> AsyncIterator[str]:
    head = head | {"object": "chat.completion.chunk"}
    seqs: dict[int, SeqResult] = {}
    cached = 0
    for j in range(params.n):
        role = {
            "index": j,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        yield sse(head | {"choices": [role]})
    async for _, out in merge_streams(tm, [TokenizedGenerateReqInput(rid, ids, params)]):
        seq = seqs.setdefault(out.index, SeqResult(out.index))
        before = len(seq.logprobs)
        seq.add(out)
        cached = out.cached_tokens
        logprobs = None
        if req.logprobs:
            logprobs = _chat_logprobs(out.token_ids, seq.logprobs[before:], tm.tokenizer)
        delta = {"content": out.text} if out.text or out.finish_reason is None else {}
        chunk = {
            "index": out.index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": _finish(out),
        }
        yield sse(head | {"choices": [chunk]})
    if include_usage:
        yield sse(head | {"choices": [], "usage": _usage(list(seqs.values()), len(ids), cached)})
    yield SSE_DONE
