"""lmprog: program and serve language models.

`import lmprog` stays light (no torch): the runtime names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": "lmprog.runtime.engine.llm",
    "AsyncLLM": "lmprog.runtime.engine.async_llm",
    "AsyncLLMEngine": "lmprog.runtime.engine.async_llm",
    "AsyncEngineArgs": "lmprog.runtime.engine.engine_args",
    "SamplingParams": "lmprog.runtime.sampling.sampling_params",
    "RequestOutputKind": "lmprog.runtime.sampling.sampling_params",
    "RequestOutput": "lmprog.runtime.engine.outputs",
    "CompletionOutput": "lmprog.runtime.engine.outputs",
    "RequestMetrics": "lmprog.runtime.engine.outputs",
    "EmbeddingRequestOutput": "lmprog.runtime.engine.outputs",
    "ClassificationRequestOutput": "lmprog.runtime.engine.outputs",
    "PoolingRequestOutput": "lmprog.runtime.engine.outputs",
    "ScoringRequestOutput": "lmprog.runtime.engine.outputs",
    "ServerArgs": "lmprog.runtime.server_args",
    "BeamSearchParams": "lmprog.runtime.sampling.beam_search",
    "BeamSearchOutput": "lmprog.runtime.sampling.beam_search",
    "BeamSearchSequence": "lmprog.runtime.sampling.beam_search",
}

# The frontend language (no torch): `from lmprog import function, gen, RuntimeEndpoint, ...`,
# so SGLang programs run with only the import changed.
_LANG_NAMES = (
    "function",
    "gen",
    "gen_int",
    "gen_string",
    "select",
    "system",
    "user",
    "assistant",
    "system_begin",
    "system_end",
    "user_begin",
    "user_end",
    "assistant_begin",
    "assistant_end",
    "set_default_backend",
    "flush_cache",
    "get_server_info",
    "separate_reasoning",
    "RuntimeEndpoint",
    "Runtime",
    "OpenAI",
    "ProgramState",
    "token_length_normalized",
    "greedy_token_selection",
    "unconditional_likelihood_normalized",
    # SGLang names lmprog cannot serve: they raise NotImplementedError, saying why, when called.
    "image",
    "video",
    "Engine",
    "Anthropic",
    "LiteLLM",
    "VertexAI",
)
_LAZY.update(dict.fromkeys(_LANG_NAMES, "lmprog.lang"))
_LAZY["global_config"] = "lmprog.lang.global_config"  # SGLang's settings object

__all__ = [  # noqa: PLE0604 -- the names are strings
    *_LANG_NAMES,
    "global_config",
    "LLM",
    "AsyncEngineArgs",
    "AsyncLLM",
    "AsyncLLMEngine",
    "ClassificationRequestOutput",
    "CompletionOutput",
    "EmbeddingRequestOutput",
    "PoolingRequestOutput",
    "RequestMetrics",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "ScoringRequestOutput",
    "ServerArgs",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lmprog' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
