"""The prompt forms the engines take, and their tokenization."""

from __future__ import annotations

from typing import Any

# A text, token ids, or {"prompt": text} / {"prompt_token_ids": ids} (vLLM's dict forms).
PromptType = str | list[int] | dict[str, Any]


def tokenize_prompt(tokenizer: Any, prompt: PromptType) -> tuple[str | None, list[int]]:
    """(text or None, token ids) of one prompt; ValueError for anything else."""
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), _token_ids(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return tokenize_prompt(tokenizer, prompt["prompt"])
        raise ValueError(
            f"a prompt dict needs 'prompt' or 'prompt_token_ids', got {sorted(prompt)}"
        )
    return None, _token_ids(prompt)


def _token_ids(ids: Any) -> list[int]:
    try:
        return [int(t) for t in ids]
    except (TypeError, ValueError):
        raise ValueError(
            "a prompt is a string, a list of token ids, or a dict with 'prompt' or "
            f"'prompt_token_ids'; got {type(ids).__name__} {str(ids)[:80]}"
        ) from None
