"""lmprog.lang: programs over language models (SGLang's frontend language).

Importable without torch: backends talk to servers over HTTP.
"""

from __future__ import annotations

from lmprog.lang.api import (
    assistant,
    assistant_begin,
    assistant_end,
    flush_cache,
    function,
    gen,
    gen_int,
    gen_string,
    get_server_info,
    select,
    separate_reasoning,
    set_default_backend,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from lmprog.lang.backend import OpenAI, Runtime, RuntimeEndpoint
from lmprog.lang.choices import (
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from lmprog.lang.state import ProgramState, ProgramStateGroup
from lmprog.lang.unsupported import Anthropic, Engine, LiteLLM, VertexAI, image, video

__all__ = [
    "Anthropic",
    "Engine",
    "LiteLLM",
    "OpenAI",
    "ProgramState",
    "ProgramStateGroup",
    "Runtime",
    "RuntimeEndpoint",
    "VertexAI",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "flush_cache",
    "function",
    "gen",
    "gen_int",
    "gen_string",
    "get_server_info",
    "greedy_token_selection",
    "image",
    "select",
    "separate_reasoning",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "token_length_normalized",
    "unconditional_likelihood_normalized",
    "user",
    "user_begin",
    "user_end",
    "video",
]
