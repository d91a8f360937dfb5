"""llama3_json: Llama 3.1-3.3's JSON tool calls. The reply is the calls, one JSON object each,
separated by "; ", optionally after the <|python_tag|> token (text before the tag is content):

    {"name": "get_weather", "parameters": {"city": "Paris"}}
    <|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {}}

A reply that starts with "{" is taken for calls until its objects prove otherwise (then it is
content, as written): streamed, such a reply arrives when it is complete.
"""

from __future__ import annotations

from lmprog.runtime.entrypoints.tool_parsers.base import (
    CallStream,
    ParseDelta,
    ToolParser,
    call_progress,
    object_end,
)

TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    decodes_special_tokens = True  # <|python_tag|> is a special token
    ARGS_KEY = "parameters"
    SEPARATOR = "; "

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._state = "start"  # start (undecided) -> text (content) <-> calls
        self._call: CallStream | None = None

    def feed(self, text: str) -> ParseDelta:
        self._buf += text
        out = ParseDelta()
        while self._step(out):
            pass
        return out

    def _step(self, out: ParseDelta) -> bool:
        """One move of the state machine; False when it needs more text."""
        if self._state == "start":
            head = self._buf.lstrip()
            if not head or (TAG.startswith(head) and head != TAG):
                return False  # could still be the tag
            if head.startswith(TAG):
                self._buf, self._state = head[len(TAG) :], "calls"
            elif head.startswith("{"):
                self._buf, self._state = head, "calls"
            else:
                self._state = "text"
            return True
        if self._state == "text":
            if not self._content_until(out, TAG):
                return False
            self._state = "calls"
            return True
        return self._step_calls(out)

    def _step_calls(self, out: ParseDelta) -> bool:
        rest = self._buf.lstrip(" \t\r\n;")
        if not rest:
            return False
        if not rest.startswith("{"):
            self._buf, self._state = rest, "text"  # not a call: the rest is content
            return True
        self._call = self._call or CallStream()
        end = object_end(rest)
        if end is None:
            self._buf = rest
            progress = call_progress(rest)
            if progress is not None:
                self._advance(out, self._call, *progress)
            return False
        self._close(out, self._call, rest[:end], rest[:end])
        self._buf, self._call = rest[end:], None
        return True

    def finish(self) -> ParseDelta:
        out = ParseDelta()
        if self._call is not None:  # an object the reply left open
            self._close(out, self._call, self._buf, self._buf)
        else:
            self._content(out, self._buf)
        self._buf, self._call, self._state = "", None, "text"
        return out
