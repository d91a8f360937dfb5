"""ChoiceParser: one chat choice's text as OpenAI's message, or as its streamed deltas.

    text ─► ReasoningParser ─► reasoning_content
                    └─ answer ─► ToolParser ─► content, tool_calls

Streaming feeds each new piece of text; a whole reply is parsed by feeding it at once, so a
message is exactly what its streamed deltas join to (a call's pieces joined into one). Calls written inside the thinking are
not calls. finish_reason "stop" becomes "tool_calls" when the reply called a tool.
"""

from __future__ import annotations

from typing import Any

from lmprog.runtime.entrypoints.chat_tools import ToolPlan
from lmprog.runtime.entrypoints.openai_protocol import ChatCompletionRequest
from lmprog.runtime.entrypoints.reasoning_parser import ReasoningParser
from lmprog.runtime.entrypoints.tool_parsers import ParseDelta, ToolParser


def reasoning_for(name: str | None, req: ChatCompletionRequest, plan: ToolPlan) -> str | None:
    """The reasoning format to split replies with; None where there is no thinking to split:
    the request turned it off (chat_template_kwargs enable_thinking false), or a grammar
    forces a tool call from the reply's first token."""
    if name is None or plan.forced is not None:
        return None
    if (req.chat_template_kwargs or {}).get("enable_thinking") is False:
        return None
    return name


class ChoiceParser:
    def __init__(self, reasoning: str | None, tools: type[ToolParser] | None) -> None:
        self.reasoning = ReasoningParser(reasoning) if reasoning else None
        self.tools = tools() if tools else None
        self.called = False

    def feed(self, text: str, last: bool = False) -> dict[str, Any]:
        """The streamed `delta` fields this piece of text completes (maybe none); `last`: the
        reply ends with it, and everything held goes out too."""
        reasoning, answer = self.reasoning.feed(text) if self.reasoning else ("", text)
        if last and self.reasoning:
            more_reasoning, more_answer = self.reasoning.finish()
            reasoning, answer = reasoning + more_reasoning, answer + more_answer
        if self.tools is None:
            return self._delta(reasoning, ParseDelta(answer))
        parsed = self.tools.feed(answer)
        if last:
            parsed.extend(self.tools.finish())
        return self._delta(reasoning, parsed)

    def _delta(self, reasoning: str, parsed: ParseDelta) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if parsed.content:
            delta["content"] = parsed.content
        if parsed.tool_calls:
            delta["tool_calls"] = [c.to_json() for c in parsed.tool_calls]
            self.called = True
        return delta

    def message(self, text: str) -> dict[str, Any]:
        """The non-streamed `message` of a whole reply."""
        delta = self.feed(text, last=True)
        content = delta.get("content", "")
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.reasoning is not None:
            message["reasoning_content"] = delta.get("reasoning_content")
        calls = delta.get("tool_calls")
        if calls:
            message["tool_calls"] = [{k: c[k] for k in ("id", "type", "function")} for c in calls]
            if not content.strip():
                message["content"] = None  # as OpenAI: only tool calls
        return message

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.called else reason
