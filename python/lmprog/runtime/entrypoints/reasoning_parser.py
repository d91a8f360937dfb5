"""ReasoningParser: splits a reasoning model's thinking off its reply, as the reply streams.

The markers are those of the frontend's `separate_reasoning` (lmprog.lang.reasoning), named the
same (`--reasoning-parser qwen3`, `deepseek-r1`, ...):

    <think>
    The user wants the sum; 2 + 2 is 4.
    </think>

    4

gives reasoning_content "The user wants the sum; 2 + 2 is 4." and content "4". Formats whose
chat template opens the thinking (deepseek-r1, qwen3-thinking) start the reply inside it, with or
without the start marker; the others (qwen3) think only when the reply starts with it. Thinking is
stripped of surrounding whitespace, and so is the start of the answer after it; a reply cut short
while thinking is all reasoning. Fed in any split, the pieces join to the same two texts.
"""

from __future__ import annotations

from lmprog.lang.reasoning import FORMATS, ReasoningFormat
from lmprog.runtime.entrypoints.tool_parsers.base import held_back

REASONING_PARSER_NAMES = tuple(FORMATS)


class ReasoningParser:
    def __init__(self, name: str) -> None:
        if name not in FORMATS:
            raise ValueError(f"reasoning_parser must be one of {', '.join(FORMATS)}; got {name!r}")
        self.fmt: ReasoningFormat = FORMATS[name]
        # start: before the first non-space text; thinking; answer_start: after the end
        # marker, dropping whitespace; answer
        self._state = "start"
        self._buf = ""  # held: a possible marker start, or whitespace that may end the thinking
        self._thought = False  # some thinking was sent (its leading whitespace is dropped)

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that this piece completes."""
        self._buf += text
        if self._state == "start":
            head = self._buf.lstrip()
            start = self.fmt.start
            if not head or (start.startswith(head) and head != start):
                return "", ""  # could still be the start marker
            if head.startswith(start):
                self._buf, self._state = head[len(start) :], "thinking"
            elif self.fmt.opens_thinking:
                self._buf, self._state = head, "thinking"
            else:
                self._state = "answer"
        if self._state == "thinking":
            return self._think()
        return "", self._answer()

    def _think(self) -> tuple[str, str]:
        end = self.fmt.end
        i = self._buf.find(end)
        if i < 0:
            sendable = self._buf[: len(self._buf) - held_back(self._buf, end)]
            body = sendable.rstrip()  # trailing whitespace may be the thinking's last
            self._buf = self._buf[len(body) :]
            return self._thinking(body), ""
        body, self._buf = self._buf[:i].rstrip(), self._buf[i + len(end) :]
        self._state = "answer_start"
        return self._thinking(body), self._answer()

    def _thinking(self, text: str) -> str:
        if not self._thought:
            text = text.lstrip()
            self._thought = bool(text)
        return text

    def _answer(self) -> str:
        if self._state == "answer_start":
            self._buf = self._buf.lstrip()
            if not self._buf:
                return ""
            self._state = "answer"
        text, self._buf = self._buf, ""
        return text

    def finish(self) -> tuple[str, str]:
        """(reasoning, content) still held when the reply ended."""
        held, self._buf = self._buf, ""
        if self._state == "start":
            return "", held
        if self._state == "thinking":
            return self._thinking(held.rstrip()), ""
        return "", held if self._state == "answer" else ""
