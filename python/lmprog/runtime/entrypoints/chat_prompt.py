"""The prompt of a chat request: its messages (and tools) rendered by the model's chat template.

Messages go to the template as the model's own templates expect them: text parts joined, an
assistant's earlier `tool_calls` with their arguments as objects (templates write them with
`tojson`), a tool message's `tool_call_id` and `name`. `tools` goes to the template, and
`chat_template_kwargs` become extra template variables (e.g. `enable_thinking`).

A template that never mentions tools (SmolLM2's, for one) would drop them silently, and the
model could not know what it may call. For such a template the tools are described in the
system message instead, with the call format of the server's tool-call parser, and earlier
calls are written into their assistant messages in that format.
"""

from __future__ import annotations

import json
from typing import Any

import jinja2

from lmprog.runtime.entrypoints.chat_tools import ToolPlan
from lmprog.runtime.entrypoints.errors import APIError
from lmprog.runtime.entrypoints.openai_protocol import ChatCompletionRequest, ChatMessage
from lmprog.runtime.entrypoints.tool_parsers import ToolParser
from lmprog.runtime.entrypoints.tool_parsers.hermes import HermesToolParser

# apply_chat_template's own arguments, which chat_template_kwargs may not override.
RESERVED_KWARGS = frozenset(
    ("conversation", "messages", "tools", "documents", "tokenize", "add_generation_prompt")
)


def render_chat(req: ChatCompletionRequest, tokenizer: Any, plan: ToolPlan) -> str:
    """The conversation rendered by the model's chat template, ready for the reply; APIError
    400 for messages the template refuses."""
    if not req.messages:
        raise APIError(400, "messages must not be empty", "messages")
    kwargs = req.chat_template_kwargs or {}
    reserved = sorted(RESERVED_KWARGS & set(kwargs))
    if reserved:
        raise APIError(
            400,
            f"chat_template_kwargs may not set {reserved}: the request's own fields give them",
            "chat_template_kwargs",
        )
    knows_tools = template_knows_tools(tokenizer)
    call_format = plan.parser or HermesToolParser
    messages = [
        _message(i, m, None if knows_tools else call_format) for i, m in enumerate(req.messages)
    ]
    tools = plan.tools
    if tools and not knows_tools:
        messages = _with_tool_prompt(messages, tools, call_format)
        tools = None
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
        )
    except (jinja2.TemplateError, ValueError, TypeError) as e:
        raise APIError(
            400, f"the model's chat template cannot render these messages: {e}", "messages"
        ) from None


def template_knows_tools(tokenizer: Any) -> bool:
    """Whether the chat template uses `tools` (a tokenizer may hold several named ones)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    texts = template.values() if isinstance(template, dict) else [template]
    return any("tools" in text for text in texts)


def _message(i: int, m: ChatMessage, call_format: type[ToolParser] | None) -> dict[str, Any]:
    """A message as the template takes it. `call_format`: write earlier tool calls into the
    content in this format (for templates that know nothing of tools)."""
    content = m.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(
                    400,
                    f"messages[{i}].content: only text parts are supported, got {part.get('type')!r}",
                    f"messages.[{i}].content",
                )
            texts.append(part["text"])
        content = "".join(texts)
    message: dict[str, Any] = {"role": m.role, "content": content or ""}
    for key in ("name", "tool_call_id", "reasoning_content"):
        if getattr(m, key) is not None:
            message[key] = getattr(m, key)
    if m.tool_calls:
        calls = [(c.function.name, _arguments(i, c.function.arguments)) for c in m.tool_calls]
        if call_format is not None:
            written = call_format.render([(name, json.dumps(args)) for name, args in calls])
            message["content"] = f"{message['content']}\n{written}".lstrip("\n")
        else:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": name, "arguments": args}}
                for c, (name, args) in zip(m.tool_calls, calls)
            ]
    return message


def _arguments(i: int, arguments: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as e:
        value = e
    if not isinstance(value, dict):
        raise APIError(
            400,
            f"messages[{i}].tool_calls: arguments must be the JSON text of an object, got "
            f"{arguments[:100]!r}",
            f"messages.[{i}].tool_calls",
        )
    return value


def _with_tool_prompt(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], call_format: type[ToolParser]
) -> list[dict[str, Any]]:
    """The messages with the tools described at the end of the system message (one is added
    when there is none)."""
    specs = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    example = call_format.render([(tools[0]["function"]["name"], '{"<parameter>": <value>}')])
    prompt = (
        "You can call these functions (JSON definitions, one per line):\n"
        f"{specs}\n\n"
        "To call a function, reply with the call alone, written like this:\n"
        f"{example}"
    )
    if messages[0]["role"] == "system":
        first = messages[0] | {"content": f"{messages[0]['content']}\n\n{prompt}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]
