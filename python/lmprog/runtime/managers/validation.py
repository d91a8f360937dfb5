"""Checks of a request against the model and the engine, shared by every front end.

Each failure is a ValueError naming the field, the value and the limit; nothing is enqueued.
"""

from __future__ import annotations

from lmprog.runtime.managers.prefill_adder import kv_need
from lmprog.runtime.sampling.sampling_params import SamplingParams


def _check_prompt_ids(input_ids: list[int], vocab_size: int) -> None:
    if not input_ids:
        raise ValueError("prompt is empty: it must have at least 1 token")
    bad = next(((i, t) for i, t in enumerate(input_ids) if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(
            f"prompt token id {bad[1]} at position {bad[0]} is outside the vocabulary "
            f"[0, {vocab_size})"
        )


def validate_request(
    input_ids: list[int],
    params: SamplingParams,
    vocab_size: int,
    context_len: int,
    max_total_tokens: int,
    page_size: int,
    max_logprobs: int,
) -> int:
    """Validates a tokenized request; returns its max new tokens (max_tokens clipped to the
    context)."""
    _check_prompt_ids(input_ids, vocab_size)
    n_prompt = len(input_ids)
    if n_prompt >= context_len:
        raise ValueError(
            f"prompt has {n_prompt} tokens; the model's context is {context_len} tokens "
            "(max_model_len), which must also leave room for at least 1 output token"
        )
    params.validate_for_model(vocab_size, max_logprobs)
    room = context_len - n_prompt
    max_new = room if params.max_tokens is None else min(params.max_tokens, room)
    need = kv_need(n_prompt, 0, params.n, max_new, page_size)
    if need > max_total_tokens:
        raise ValueError(
            f"request needs up to {need} KV slots (prompt {n_prompt} + n={params.n} x "
            f"{max_new} new tokens); the KV pool holds {max_total_tokens} (max_total_tokens)"
        )
    return max_new


def validate_embedding_request(
    input_ids: list[int], vocab_size: int, max_length: int, max_total_tokens: int | None
) -> None:
    """Validates a tokenized embedding request: non-empty, in the vocabulary, within the
    model's input limit (and, for a decoder embedder, the KV pool)."""
    _check_prompt_ids(input_ids, vocab_size)
    if len(input_ids) > max_length:
        raise ValueError(
            f"input has {len(input_ids)} tokens; this embedding model takes at most "
            f"{max_length} (set truncate_prompt_tokens to keep only the last tokens)"
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
