"""hermes: each call a JSON object between <tool_call> and </tool_call>, content around them.
Qwen2.5, Qwen3 and Hermes 2/3 write it (SGLang calls it qwen25):

    Let me look that up.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

from lmprog.runtime.entrypoints.tool_parsers.base import (
    CallStream,
    ParseDelta,
    ToolParser,
    call_progress,
)

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"
    CALL_PREFIX = START + "\n"
    CALL_SUFFIX = "\n" + END
    SEPARATOR = "\n"

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""  # text not yet sent: a possible marker start, or the open call's body
        self._call: CallStream | None = None

    def feed(self, text: str) -> ParseDelta:
        self._buf += text
        out = ParseDelta()
        while True:
            if self._call is None:
                if not self._content_until(out, START):
                    return out
                self._call = CallStream()
                continue
            j = self._buf.find(END)
            if j < 0:
                progress = call_progress(self._buf)
                if progress is not None:
                    self._advance(out, self._call, *progress)
                return out
            body, self._buf = self._buf[:j], self._buf[j + len(END) :]
            self._close(out, self._call, body, START + body + END)
            self._call = None

    def finish(self) -> ParseDelta:
        out = ParseDelta()
        if self._call is not None:  # the reply ended inside a call (no end tag)
            self._close(out, self._call, self._buf, START + self._buf)
        else:
            self._content(out, self._buf)
        self._buf, self._call = "", None
        return out
