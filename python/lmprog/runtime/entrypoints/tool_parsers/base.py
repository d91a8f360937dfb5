"""ToolParser: finds the tool calls in a model's reply as it streams, in OpenAI's shape.

A parser reads one choice's text: `feed` each piece as it is generated, then `finish` once.
Each returns a ParseDelta: the new content text and the new pieces of tool calls. Invariants:

- however the text is split into pieces, the deltas join to the same content and the same
  calls (a marker cut in two, like `<tool_` + `call>`, is held until it is whole);
- a call's first delta carries its `id` and `name`; the `arguments` pieces of a call join to
  the JSON text of its arguments object (as the model wrote it);
- once a call is announced it stays a call; text that turns out not to be a call before it
  was announced goes to the content, as written.

Each format is a few strings (class attributes); the calls are written

    CALLS_PREFIX + call + SEPARATOR + call ... + CALLS_SUFFIX
    call = CALL_PREFIX + '{"name": "<name>", "<ARGS_KEY>": ' + <arguments> + "}" + CALL_SUFFIX

`render` writes calls that way (for prompts) and `structural_tag` builds the grammar that makes
a model write exactly that (tool_choice "required" or a named function).
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

# The start of a call object written name first, up to where its arguments begin.
_NAME_FIRST = re.compile(
    r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*'
)


def new_call_id() -> str:
    """An id like OpenAI's: "call_" and 24 letters and digits."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallDelta:
    """A piece of the `index`-th call of a choice: the first piece has its id and name."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_json(self) -> dict[str, Any]:
        """The piece as an entry of a streamed `delta.tool_calls`."""
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        function = {"name": self.name, "arguments": self.arguments}
        return {"index": self.index, "id": self.id, "type": "function", "function": function}


@dataclass
class ParseDelta:
    """What a piece of text added: content and tool-call pieces (at most one per call)."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def add_call(self, piece: ToolCallDelta | None) -> None:
        if piece is None:
            return
        for mine in self.tool_calls:
            if mine.index == piece.index:  # one entry per call and chunk
                mine.arguments += piece.arguments
                return
        self.tool_calls.append(piece)

    def extend(self, other: ParseDelta) -> ParseDelta:
        self.content += other.content
        for piece in other.tool_calls:
            self.add_call(piece)
        return self


class CallStream:
    """One call of a choice while it is written. Its parser `start`s it (numbering it) once
    it knows it is a call; the first `advance` announces it (id and name), later ones send
    the new part of its arguments text."""

    def __init__(self) -> None:
        self.index = -1
        self.id: str | None = None  # set by `start`
        self.announced = False
        self.sent = ""  # the arguments text sent so far

    @property
    def started(self) -> bool:
        return self.id is not None

    def start(self, index: int) -> None:
        self.index, self.id = index, new_call_id()

    def advance(self, name: str, arguments: str) -> ToolCallDelta | None:
        """`arguments`: the arguments text written so far, which extends what was sent."""
        assert self.started, "the parser starts (numbers) a call before it advances"
        new = arguments[len(self.sent) :] if arguments.startswith(self.sent) else ""
        self.sent += new
        if self.announced:
            return ToolCallDelta(self.index, arguments=new) if new else None
        self.announced = True
        return ToolCallDelta(self.index, self.id, name, new)


class ToolParser(ABC):
    """One choice's reader of tool calls in one format (see the module's docstring)."""

    name: ClassVar[str]
    # The format's markers are special tokens: the output must be decoded with them.
    decodes_special_tokens: ClassVar[bool] = False
    CALLS_PREFIX: ClassVar[str] = ""
    CALLS_SUFFIX: ClassVar[str] = ""
    CALL_PREFIX: ClassVar[str] = ""
    CALL_SUFFIX: ClassVar[str] = ""
    SEPARATOR: ClassVar[str]
    ARGS_KEY: ClassVar[str] = "arguments"

    def __init__(self) -> None:
        self.calls = 0  # calls started (numbered) so far
        self._space = ""  # whitespace after a call, held until other content follows

    @abstractmethod
    def feed(self, text: str) -> ParseDelta:
        """The next piece of the reply; what it completes."""

    @abstractmethod
    def finish(self) -> ParseDelta:
        """The reply ended: everything still held."""

    # ---- the format, written --------------------------------------------------------------
    @classmethod
    def call_begin(cls, name: str) -> str:
        return f'{cls.CALL_PREFIX}{{"name": {json.dumps(name)}, "{cls.ARGS_KEY}": '

    @classmethod
    def call_end(cls) -> str:
        return "}" + cls.CALL_SUFFIX

    @classmethod
    def render(cls, calls: list[tuple[str, str]]) -> str:
        """(name, arguments JSON text) calls as the model writes them."""
        body = cls.SEPARATOR.join(cls.call_begin(n) + a + cls.call_end() for n, a in calls)
        return cls.CALLS_PREFIX + body + cls.CALLS_SUFFIX

    @classmethod
    def structural_tag(cls, functions: list[dict[str, Any]], parallel: bool) -> str:
        """xgrammar's structural tag (JSON text) for one call or more of `functions` (each
        {"name", "parameters": a JSON schema}), exactly in this format; just one call unless
        `parallel`."""
        tags = [
            {
                "type": "tag",
                "begin": cls.call_begin(f["name"]),
                "content": {"type": "json_schema", "json_schema": f["parameters"]},
                "end": cls.call_end(),
            }
            for f in functions
        ]
        calls = {
            "type": "tags_with_separator",
            "tags": tags,
            "separator": cls.SEPARATOR,
            "at_least_one": True,
            "stop_after_first": not parallel,
        }
        elements = [
            *([{"type": "const_string", "value": cls.CALLS_PREFIX}] if cls.CALLS_PREFIX else []),
            calls,
            *([{"type": "const_string", "value": cls.CALLS_SUFFIX}] if cls.CALLS_SUFFIX else []),
        ]
        fmt = calls if len(elements) == 1 else {"type": "sequence", "elements": elements}
        return json.dumps({"type": "structural_tag", "format": fmt})

    # ---- for the parsers ------------------------------------------------------------------
    def _content(self, out: ParseDelta, text: str) -> None:
        """Content text; whitespace after a call is held until other text follows it (and
        dropped if none does)."""
        if self.calls and not (self._space + text).strip():
            self._space += text
            return
        out.content += self._space + text
        self._space = ""

    def _content_until(self, out: ParseDelta, marker: str) -> bool:
        """Sends the buffered text (`self._buf`) before `marker` as content and drops the
        marker: True. Without it, sends all that cannot start the marker and keeps the rest:
        False (more text needed)."""
        i = self._buf.find(marker)
        if i < 0:
            keep = len(self._buf) - held_back(self._buf, marker)
            self._content(out, self._buf[:keep])
            self._buf = self._buf[keep:]
            return False
        self._content(out, self._buf[:i])
        self._buf = self._buf[i + len(marker) :]
        return True

    def _advance(self, out: ParseDelta, call: CallStream, name: str, arguments: str) -> None:
        if not call.started:
            call.start(self.calls)
            self.calls += 1
        out.add_call(call.advance(name, arguments))

    def _close(self, out: ParseDelta, call: CallStream, text: str, raw: str) -> None:
        """`text` is the whole JSON object of `call`; `raw` is how it was written, markers
        and all, which is content if it turns out not to be a call."""
        parsed = parse_call(text)
        if parsed is not None:
            self._advance(out, call, *parsed)
        elif not call.started:
            self._content(out, raw)


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker` (to hold
    until the next piece tells)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def object_end(text: str, start: int = 0) -> int | None:
    """Index just past the JSON object or array opening at text[start]; None while it is
    still open. Brackets inside strings do not count."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def call_progress(text: str) -> tuple[str, str] | None:
    """(name, arguments text so far) of a call object that is still being written, once its
    name is complete and its arguments object has begun; None before that (or when the object
    is not written name first, which only its end will tell)."""
    m = _NAME_FIRST.match(text)
    if m is None or not text.startswith("{", m.end()):
        return None
    end = object_end(text, m.end())
    return json.loads(m.group(1)), text[m.end() : end]


def parse_call(text: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a whole call object `{"name": .., "arguments": {..}}`
    ("parameters" too); None when it is not one. The arguments text is as the model wrote it
    when the name came first (so it extends what `call_progress` gave), else re-serialized."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    progress = call_progress(text.strip())
    if progress is not None and progress[0] == obj["name"]:
        return progress
    return obj["name"], json.dumps(args, ensure_ascii=False)
