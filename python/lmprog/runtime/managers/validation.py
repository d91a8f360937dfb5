"""Checks of a request against the model and the engine, shared by every front end.

Each failure is a ValueError naming the field, the value and the limit; nothing is enqueued.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmprog.runtime.managers.prefill_adder import kv_need
from lmprog.runtime.sampling.param_error import ParamError
from lmprog.runtime.sampling.sampling_params import SamplingParams


class ContextLengthError(ValueError):
    """The prompt, or the prompt with max_tokens, does not fit the model's context (OpenAI's
    code `context_length_exceeded`)."""


@dataclass(frozen=True)
class RequestLimits:
    """What a request is checked against: the model's and the engine's limits."""

    vocab_size: int
    context_len: int
    max_total_tokens: int
    page_size: int
    max_logprobs: int
    max_running_requests: int


def _check_prompt_ids(input_ids: list[int], vocab_size: int) -> None:
    if not input_ids:
        raise ParamError("prompt is empty: it must have at least 1 token", "prompt")
    bad = next(((i, t) for i, t in enumerate(input_ids) if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ParamError(
            f"prompt token id {bad[1]} at position {bad[0]} is outside the vocabulary "
            f"[0, {vocab_size}): the model has {vocab_size} tokens",
            "prompt",
        )


def validate_request(
    input_ids: list[int],
    params: SamplingParams,
    limits: RequestLimits,
    strict_length: bool = False,
) -> int:
    """Validates a tokenized request; returns its max new tokens.

    `max_tokens` beyond the context is clipped to it (vLLM's offline behaviour: the sequence
    stops at the context with finish_reason 'length'), or, with `strict_length` (the HTTP
    routes, as OpenAI, vLLM's and SGLang's servers do), refused with both numbers.
    """
    _check_prompt_ids(input_ids, limits.vocab_size)
    n_prompt, context_len = len(input_ids), limits.context_len
    if n_prompt >= context_len:
        raise ContextLengthError(
            f"prompt has {n_prompt} tokens; the model's context is {context_len} tokens "
            "(max_model_len), which must also leave room for at least 1 output token"
        )
    if params.n > limits.max_running_requests:
        raise ParamError(
            f"n must be <= {limits.max_running_requests} (the server's max_running_requests: "
            f"its {params.n} sequences must run at once), got {params.n}",
            "n",
        )
    params.validate_for_model(limits.vocab_size, limits.max_logprobs)
    room = context_len - n_prompt
    if strict_length and params.max_tokens is not None and params.max_tokens > room:
        raise ContextLengthError(
            f"the model's context is {context_len} tokens; this request asks for "
            f"{n_prompt + params.max_tokens} ({n_prompt} in the prompt + {params.max_tokens} "
            "max_tokens): shorten the prompt or lower max_tokens"
        )
    max_new = room if params.max_tokens is None else min(params.max_tokens, room)
    need = kv_need(n_prompt, 0, params.n, max_new, limits.page_size)
    if need > limits.max_total_tokens:
        raise ValueError(
            f"request needs up to {need} KV slots (prompt {n_prompt} + n={params.n} x "
            f"{max_new} new tokens); the KV pool holds {limits.max_total_tokens} "
            "(max_total_tokens)"
        )
    return max_new


def validate_pooling_request(
    input_ids: list[int], vocab_size: int, max_length: int, max_total_tokens: int | None
) -> None:
    """Validates a tokenized request to a pooling model (embed, classify, score, reward):
    non-empty, in the vocabulary, within the model's input limit (and, for a decoder, the KV
    pool)."""
    _check_prompt_ids(input_ids, vocab_size)
    if len(input_ids) > max_length:
        raise ParamError(
            f"input has {len(input_ids)} tokens; this model takes at most {max_length} "
            "(truncate_prompt_tokens cuts longer inputs to fit)",
            "prompt",
        )
    if max_total_tokens is not None and len(input_ids) > max_total_tokens:
        raise ValueError(
            f"input has {len(input_ids)} tokens; the KV pool holds {max_total_tokens} "
            "(max_total_tokens)"
        )


def truncate_prompt(input_ids: list[int], keep: int) -> list[int]:
    """The last `keep` tokens (`truncate_prompt_tokens`: embedders keep a long input's end)."""
    if type(keep) is not int or keep < 1:
        raise ValueError(f"truncate_prompt_tokens must be an integer >= 1, got {keep!r}")
    return input_ids[-keep:]
