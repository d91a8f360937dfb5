"""mistral: the [TOOL_CALLS] token, then the calls. Two spellings, both read:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]    (tokenizer v3)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}                          (tokenizer v11+)

In the second, each call has its own [TOOL_CALLS] (and may carry [CALL_ID]<id> after the name).
Text before [TOOL_CALLS] is content. Calls are enforced (tool_choice required) in the first.
"""

from __future__ import annotations

import json
import re

from lmprog.runtime.entrypoints.tool_parsers.base import (
    CallStream,
    ParseDelta,
    ToolParser,
    call_progress,
    object_end,
)

TAG, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class MistralToolParser(ToolParser):
    name = "mistral"
    decodes_special_tokens = True  # [TOOL_CALLS] and [ARGS] are special tokens
    CALLS_PREFIX = TAG + "["
    CALLS_SUFFIX = "]"
    SEPARATOR = ", "

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._state = "text"  # text -> tagged -> array | named -> text
        self._call: CallStream | None = None

    def feed(self, text: str) -> ParseDelta:
        self._buf += text
        out = ParseDelta()
        while getattr(self, f"_step_{self._state}")(out):
            pass
        return out

    def _step_text(self, out: ParseDelta) -> bool:
        if not self._content_until(out, TAG):
            return False
        self._state = "tagged"
        return True

    def _step_tagged(self, out: ParseDelta) -> bool:
        head = self._buf.lstrip()
        if not head:
            return False
        if head.startswith("["):
            self._buf, self._state = head[1:], "array"
        else:
            self._buf, self._state = head, "named"
        return True

    def _step_array(self, out: ParseDelta) -> bool:
        rest = self._buf.lstrip(" \t\r\n,")
        if not rest:
            return False
        if not rest.startswith("{"):  # "]" ends the calls; anything else is content
            self._buf, self._state = rest.removeprefix("]"), "text"
            return True
        self._call = self._call or CallStream()
        end = object_end(rest)
        if end is None:
            self._buf = rest
            progress = call_progress(rest)
            if progress is not None:
                self._advance(out, self._call, *progress)
            return False
        self._close(out, self._call, rest[:end], TAG + rest[:end])
        self._buf, self._call = rest[end:], None
        return True

    def _step_named(self, out: ParseDelta) -> bool:
        """name[ARGS]{...}: announced once the name is whole, the arguments streamed."""
        i = self._buf.find(ARGS)
        if i < 0:
            return False
        name = self._buf[:i].split(CALL_ID)[0].strip()
        rest = self._buf[i + len(ARGS) :].lstrip()
        if not rest:
            return False
        self._call = self._call or CallStream()
        if not _NAME.fullmatch(name) or not rest.startswith("{"):
            return self._not_a_call(out)
        end = object_end(rest)
        if end is not None and not _is_object(rest[:end]):
            return self._not_a_call(out)
        self._advance(out, self._call, name, rest[:end])
        if end is None:
            return False
        self._buf, self._call, self._state = rest[end:], None, "text"
        return True

    def _not_a_call(self, out: ParseDelta) -> bool:
        if self._call is None or not self._call.started:
            self._content(out, TAG + self._buf)
        self._buf, self._call, self._state = "", None, "text"
        return False

    def finish(self) -> ParseDelta:
        out = ParseDelta()
        if self._state == "text":
            self._content(out, self._buf)
        elif self._call is not None and self._state == "array":
            self._close(out, self._call, self._buf, TAG + "[" + self._buf)
        elif self._call is None or not self._call.started:
            self._content(out, TAG + ("[" if self._state == "array" else "") + self._buf)
        self._buf, self._call, self._state = "", None, "text"
        return out


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False
