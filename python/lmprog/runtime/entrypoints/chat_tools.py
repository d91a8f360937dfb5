"""How a chat request uses tools: checks `tools`, `tool_choice` and `parallel_tool_calls` as
OpenAI does (a 400 naming the field), and decides the ToolPlan:

    tool_choice          the prompt shows the tools   the reply is parsed   a grammar enforces
    "none" (no tools)    no                           no                    nothing
    "auto" (tools)       yes                          yes                   nothing
    "required"           yes                          yes                   one call or more (one
                                                                            if not parallel)
    {"function": name}   yes                          yes                   one call of `name`

The calls are written (and enforced) in the format of the server's --tool-call-parser; their
arguments follow each function's JSON-schema `parameters`. A server without a parser takes
tools only with tool_choice "none".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lmprog.runtime.entrypoints.errors import APIError
from lmprog.runtime.entrypoints.openai_protocol import ChatCompletionRequest
from lmprog.runtime.entrypoints.tool_parsers import TOOL_PARSER_NAMES, ToolParser, get_tool_parser

# OpenAI's rule for function names.
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
NO_PARAMETERS = {"type": "object", "properties": {}}
TOOL_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolPlan:
    parser: type[ToolParser] | None = None  # reads the calls in the reply; None: no reading
    tools: list[dict[str, Any]] | None = None  # shown by the prompt (OpenAI's tool objects)
    forced: list[dict[str, Any]] | None = None  # {"name", "parameters"}: a call is enforced
    parallel: bool = True  # the enforced calls may be several

    def sampling_values(self, req: ChatCompletionRequest) -> dict[str, Any]:
        """What the plan adds to the request's SamplingParams values."""
        values: dict[str, Any] = {}
        if self.parser is None:
            return values
        if self.parser.decodes_special_tokens and req.skip_special_tokens is None:
            values["skip_special_tokens"] = False  # its markers are special tokens
        if self.forced is not None:
            values["structural_tag"] = self.parser.structural_tag(self.forced, self.parallel)
        return values


def plan_tools(req: ChatCompletionRequest, parser_name: str | None) -> ToolPlan:
    """The request's ToolPlan; APIError 400 for tools or a tool_choice OpenAI would refuse."""
    tools = req.tools
    if tools is None:
        for field in ("tool_choice", "parallel_tool_calls"):
            if getattr(req, field) is not None:
                raise APIError(
                    400, f"{field} is only allowed when tools are given (no tools given)", field
                )
        return ToolPlan()
    if not tools:
        raise APIError(
            400,
            "tools is an empty array: give at least one tool, or leave tools out",
            "tools",
            code="empty_array",
        )
    names = _check_names(req)
    choice, named = _tool_choice(req.tool_choice, names)
    if choice == "none":
        return ToolPlan()
    if parser_name is None:
        raise APIError(
            400,
            f"tool_choice {_shown(choice, named)} needs a server that reads tool calls: start it "
            "with "
            f"--tool-call-parser (one of {', '.join(TOOL_PARSER_NAMES)}: the format the model "
            "writes calls in), or send tool_choice 'none'",
            "tools",
        )
    # A named function is called once (as OpenAI and vLLM do); "required" may call several
    # unless parallel_tool_calls is false.
    parallel = choice == "required" and req.parallel_tool_calls is not False
    forced = None
    if choice != "auto":
        if req.constraint_values():
            raise APIError(
                400,
                f"tool_choice {_shown(choice, named)} is enforced with a grammar and cannot be "
                "combined "
                "with another output constraint (response_format, regex, ebnf, guided_*)",
                "tool_choice",
            )
        picked = [t for t in tools if choice == "required" or t.function.name == named]
        forced = [
            {"name": t.function.name, "parameters": t.function.parameters or NO_PARAMETERS}
            for t in picked
        ]
    dumped = [t.model_dump(exclude_none=True) for t in tools]
    return ToolPlan(get_tool_parser(parser_name), dumped, forced, parallel)


def _check_names(req: ChatCompletionRequest) -> list[str]:
    names: list[str] = []
    for i, tool in enumerate(req.tools or []):
        fn = tool.function
        if not FUNCTION_NAME.fullmatch(fn.name):
            raise APIError(
                400,
                f"tools[{i}].function.name {fn.name!r} is not a valid function name: use 1 to "
                "64 letters, digits, underscores and dashes",
                f"tools.[{i}].function.name",
                code="invalid_value",
            )
        if fn.name in names:
            raise APIError(
                400,
                f"tools[{i}].function.name {fn.name!r} is given twice; names must be unique",
                f"tools.[{i}].function.name",
            )
        if fn.parameters is not None and fn.parameters.get("type", "object") != "object":
            raise APIError(
                400,
                f"tools[{i}].function.parameters must be a JSON Schema of type 'object', got "
                f"type {fn.parameters.get('type')!r}",
                f"tools.[{i}].function.parameters",
            )
        names.append(fn.name)
    return names


def _tool_choice(value: Any, names: list[str]) -> tuple[str, str | None]:
    """("none" | "auto" | "required", None) or ("named", the function's name)."""
    if value is None:
        return "auto", None
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            raise APIError(
                400,
                f"tool_choice {value!r} is not one of 'none', 'auto', 'required' (or "
                "{'type': 'function', 'function': {'name': ...}})",
                "tool_choice",
                code="invalid_value",
            )
        return value, None
    fn = value.get("function") if isinstance(value, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or value.get("type") != "function":
        raise APIError(
            400,
            f"tool_choice {value!r} is not a named function: give {{'type': 'function', "
            "'function': {'name': ...}}, or one of 'none', 'auto', 'required'",
            "tool_choice",
        )
    if name not in names:
        raise APIError(
            400,
            f"tool_choice names the function {name!r}, which is not in tools "
            f"(tools has {', '.join(map(repr, names))})",
            "tool_choice",
        )
    return "named", name


def _shown(choice: str, named: str | None) -> str:
    return f"(the function {named!r})" if choice == "named" else repr(choice)


def explain_grammar_error(e: APIError, plan: ToolPlan) -> APIError:
    """A forced call's grammar that does not compile is a fault of the tools' parameters."""
    if plan.forced is None or e.status != 400 or not e.message.startswith("invalid structural_tag"):
        return e
    reason = e.message.split(":", 1)[-1].strip()
    message = f"tools: the functions' parameters cannot be enforced as JSON Schema: {reason}"
    return APIError(400, message, "tools")
