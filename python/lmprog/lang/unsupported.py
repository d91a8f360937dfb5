"""SGLang names that lmprog cannot serve, kept so SGLang programs import unchanged.

Each raises NotImplementedError saying why when it is called, never at import: a program that
imports `image` but only uses it on some paths still runs the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

_BACKENDS = (
    "lmprog's backends are RuntimeEndpoint / Runtime (an lmprog server) and OpenAI, which "
    "serves any OpenAI-compatible API: OpenAI(model, base_url=..., api_key=...)"
)


def _unsupported(name: str, why: str) -> Callable[..., NoReturn]:
    def stub(*args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(f"{name} is not supported by lmprog: {why}")

    stub.__name__ = stub.__qualname__ = name
    stub.__doc__ = f"Not supported: {why}."
    return stub


image = _unsupported(
    "image", "lmprog serves text-only language models, and an image needs a vision model"
)
video = _unsupported(
    "video", "lmprog serves text-only language models, and a video needs a vision model"
)
Anthropic = _unsupported("Anthropic", _BACKENDS)
LiteLLM = _unsupported("LiteLLM", _BACKENDS + " (a LiteLLM proxy is one)")
VertexAI = _unsupported("VertexAI", _BACKENDS)
Engine = _unsupported(
    "Engine",
    "its offline engine is lmprog.LLM, with vLLM's interface: "
    "LLM(model=...).generate(prompts, SamplingParams(...))",
)
