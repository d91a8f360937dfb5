"""The text a request is routed on: a string whose prefix is stable across the requests that
share KV on a worker (a conversation's turns, a few-shot prefix's questions).

- /generate: `text` (SGLang) or `prompt` (vLLM), else `input_ids` written as numbers;
- /v1/completions: `prompt` (a string, or token ids written as numbers);
- /v1/chat/completions: each message as "role: content", in order, so turn k+1 extends turn k;
- /v1/embeddings and the pooling routes: `input` (or `text`).
A batch (a list of prompts) routes on its first. Anything else routes on "" (no prefix: the
cache-aware policy then places it as new text).
"""

from __future__ import annotations

from typing import Any


def routing_text(path: str, body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    if path.endswith("/chat/completions"):
        return _messages_text(body.get("messages"))
    for key in ("text", "prompt", "input", "input_ids"):
        if key in body:
            return _prompt_text(body[key])
    return ""


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return " ".join(map(str, prompt))
        return _prompt_text(prompt[0])
    return ""


def _messages_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    parts = []
    for message in messages:
        if isinstance(message, dict):
            parts.append(f"{message.get('role', '')}: {_content_text(message.get('content'))}\n")
    return "".join(parts)


def _content_text(content: Any) -> str:
    """A message's content: a string, or OpenAI's list of parts (its text parts, in order)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""
