"""Tool-call parsers: the formats in which models write tool calls, chosen by name.

    hermes       Qwen2.5, Qwen3, Hermes 2/3: <tool_call>{"name": .., "arguments": ..}</tool_call>
    llama3_json  Llama 3.1-3.3: {"name": .., "parameters": ..}, after an optional <|python_tag|>
    mistral      Mistral: [TOOL_CALLS][{"name": .., "arguments": ..}] (or name[ARGS]{..})

SGLang's names are accepted too: qwen25 and qwen (hermes), llama3 (llama3_json). The modules
load on first use.
"""

from __future__ import annotations

import importlib

from lmprog.runtime.entrypoints.tool_parsers.base import ParseDelta, ToolCallDelta, ToolParser

__all__ = [
    "TOOL_PARSER_NAMES",
    "ParseDelta",
    "ToolCallDelta",
    "ToolParser",
    "canonical_tool_parser",
    "get_tool_parser",
]

_PARSERS = {
    "hermes": "hermes:HermesToolParser",
    "llama3_json": "llama3_json:Llama3JsonToolParser",
    "mistral": "mistral:MistralToolParser",
}
_ALIASES = {"qwen25": "hermes", "qwen": "hermes", "llama3": "llama3_json"}
TOOL_PARSER_NAMES = (*_PARSERS, *_ALIASES)


def canonical_tool_parser(name: str) -> str:
    """The parser's own name for `name` (an alias or itself); ValueError naming the choices."""
    canonical = _ALIASES.get(name, name)
    if canonical not in _PARSERS:
        raise ValueError(
            f"tool_call_parser must be one of {', '.join(TOOL_PARSER_NAMES)}; got {name!r}"
        )
    return canonical


def get_tool_parser(name: str) -> type[ToolParser]:
    module, cls = _PARSERS[canonical_tool_parser(name)].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
