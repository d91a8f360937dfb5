"""A cross-encoder's input: two texts tokenized as one sequence, as the model was trained.

The tokenizer joins the pair with the model's special tokens (BERT: "[CLS] a [SEP] b [SEP]")
and, for encoders that read them, says which segment each token is in (0, then 1).
"""

from __future__ import annotations

from typing import Any


def encode_pair(
    tokenizer: Any, text_1: str, text_2: str, max_length: int | None = None
) -> tuple[list[int], list[int] | None]:
    """(input ids, token type ids or None when every token is in segment 0). `max_length`
    (a score request's truncate_prompt_tokens) trims the longer text first, token by token,
    keeping the special tokens."""
    if not isinstance(text_1, str) or not isinstance(text_2, str):
        kinds = f"{type(text_1).__name__} and {type(text_2).__name__}"
        raise TypeError(f"a cross-encoder scores pairs of texts (strings), got {kinds}")
    if max_length is not None and (type(max_length) is not int or max_length < 1):
        raise ValueError(f"truncate_prompt_tokens must be an integer >= 1, got {max_length!r}")
    encoded = tokenizer(
        text_1,
        text_2,
        truncation=max_length is not None,
        max_length=max_length,
        return_token_type_ids=True,
    )
    ids, types = list(encoded["input_ids"]), encoded.get("token_type_ids")
    if max_length is not None and len(ids) > max_length:
        raise ValueError(
            f"truncate_prompt_tokens={max_length} cannot hold the pair: it keeps {len(ids)} "
            "tokens, the model's special tokens and at least one of each text"
        )
    return ids, list(types) if types and any(types) else None


def pair_up(
    first: list[Any], second: list[Any], names: tuple[str, str] = ("data_1", "data_2")
) -> tuple[list[Any], list[Any]]:
    """The pairs a score call means: one text against each of many (1:N), or the i-th with
    the i-th (N:N); ValueError naming both counts otherwise."""
    n1, n2 = len(first), len(second)
    if n2 == 0 or n1 not in (1, n2):
        raise ValueError(
            f"score pairs texts: {names[0]} has {n1} and {names[1]} {n2}; give one text and "
            "a list, or two lists of the same non-zero length"
        )
    return (first * n2 if n1 == 1 else first), second
