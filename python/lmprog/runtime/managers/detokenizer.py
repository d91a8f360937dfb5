"""Incremental detokenization and stop strings for one request.

- `IncrementalDetokenizer` turns output token ids, as they arrive, into text deltas. Each call
  decodes a short window of tokens (O(window), not O(output length)) and never emits half a
  character: a token that ends inside a multi-byte UTF-8 character is held back until a later
  token completes it, or until `flush()` at the end of the request.
- `StopStringMatcher` finds stop strings in text that arrives in pieces, scanning only the tail
  that a new match could touch, and says how much of the text could still be the beginning of one.
- `OutputText` puts the two together: the per-request object the scheduler appends tokens to, and
  the streaming side reads safe text from (a stop string never leaks into a stream).

Text convention. The output text is the text that the output tokens add after the prompt's text,
``decode(prompt + output)[len(decode(prompt)):]``, computed with the last few prompt tokens as
context (what vLLM streams too). For byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM2)
this is exactly ``tokenizer.decode(output_ids)``. For SentencePiece-style tokenizers whose decoder
drops the leading space of the first token (Metaspace or Strip decoders: Llama 2, Mistral) the
first output token keeps its space: " Paris" after "The capital of France is", so that prompt +
completion reads right, where ``decode(output_ids)`` says "Paris". When the prompt's text ends
inside a character (its last token is a partial byte sequence), the prompt is not used as context
and the output text is ``decode(output_ids)``. `clean_up_tokenization_spaces` (a WordPiece-era
post-process that generative tokenizers turn off) is never applied: it can rewrite text across a
window boundary after it was sent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer as RustTokenizer

# A decoder renders an incomplete UTF-8 sequence (or an invalid byte) as U+FFFD.
_REPLACEMENT = "\ufffd"
# Tokens kept as context when the window slides. Decoders in use need at most one token of
# context (a Metaspace leading space) once the window starts on a character boundary, which
# `_clean_start` ensures; vLLM keeps 5. Fewer tokens per decode is most of the cost of an append.
_CONTEXT_TOKENS = 3
# The window slides once it holds this many tokens, so one decode per append covers at most
# this many, and the slide (one extra decode) happens once every 8 - 3 = 5 appends.
_MAX_WINDOW_TOKENS = 8
# Window starts tried (each one token earlier) before a slide gives up until later.
_SLIDE_TRIES = 4
# Prompt tokens searched for a clean start of the first window (vLLM v1 searches 24 too): a
# long run of byte-fallback tokens (an emoji ZWJ sequence is 18) has no clean start inside.
_PROMPT_LOOKBACK = 24

DecodeFn = Callable[[list[int]], str]


def make_decode_fn(
    tokenizer: Any, skip_special_tokens: bool, spaces_between_special_tokens: bool
) -> tuple[DecodeFn, frozenset[int]]:
    """Returns (decode, skipped_ids) for a transformers tokenizer or a `tokenizers.Tokenizer`.

    `decode(ids)` renders ids exactly as `tokenizer.decode(ids, skip_special_tokens=...)` does,
    without `clean_up_tokenization_spaces`. `skipped_ids` are the ids that decode drops (empty
    unless skip_special_tokens): callers leave them out of the window up front, so a long run of
    special tokens (EOS under ignore_eos) neither grows the window nor empties it.
    """
    backend = tokenizer if isinstance(tokenizer, RustTokenizer) else None
    backend = backend or getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, RustTokenizer):
        # A fast tokenizer: transformers' decode is this same Rust call plus Python overhead
        # (3-5x slower on a short window). Fast tokenizers have no spaces_between_special_tokens.
        rust_decode = backend.decode

        def decode(ids: list[int]) -> str:
            return rust_decode(ids, skip_special_tokens)  # positional: cheaper than a partial

        special = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    else:
        decode = functools.partial(
            tokenizer.decode,
            skip_special_tokens=skip_special_tokens,
            spaces_between_special_tokens=spaces_between_special_tokens,
            clean_up_tokenization_spaces=False,
        )
        special = set(tokenizer.all_special_ids)
    return decode, frozenset(special if skip_special_tokens else ())


def _clean_start(
    decode: DecodeFn, ids: list[int], text: str, starts: Sequence[int]
) -> tuple[int, str] | None:
    """The first start in `starts` from which `ids` decode to a suffix of `text`, and that suffix.

    A window must not begin inside a character or inside a run of byte-fallback tokens (whose
    decoder renders the whole run at once), nor render empty (a Strip/Metaspace decoder would then
    drop the next token's leading space): such a start renders differently from the full text,
    and the check catches all of these without knowing the decoder.
    """
    for start in starts:
        suffix = decode(ids[start:])
        if suffix and not suffix.startswith(_REPLACEMENT) and text.endswith(suffix):
            return start, suffix
    return None


class IncrementalDetokenizer:
    """Turns output token ids, as they arrive, into stable text deltas.

    Guarantees:
    - ``"".join(deltas) + flush()`` is the output text of the module docstring's convention;
      for byte-level BPE tokenizers that is ``tokenizer.decode(output_ids, skip_special_tokens)``.
    - A delta from `append` never ends with U+FFFD: a token ending inside a multi-byte character
      is held back until the character completes (U+FFFD inside a delta is invalid bytes that the
      full decode renders the same way). `flush` emits whatever decodes, U+FFFD included.
    - Deltas are never retracted.
    - One `append` decodes at most 8 tokens plus the held-back ones (the window), whatever the
      output length.

    Window (the prefix/read offset technique with the prefix kept whole)::

        _ids:  [ context (prompt tail or emitted output) | pending: held back ]
                 0                                   _read                  len
        _read_text == decode(_ids[:_read]);  delta == decode(_ids)[len(_read_text):]
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._decode, self._skipped = make_decode_fn(
            tokenizer, skip_special_tokens, spaces_between_special_tokens
        )
        self._ids, self._read_text = self._seed(prompt_ids)
        self._read = len(self._ids)
        self._slide_at = _MAX_WINDOW_TOKENS
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """All stable output text so far (joins lazily: read it at the end, stream the deltas)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def append(self, token_ids: Sequence[int]) -> str:
        """Adds newly generated tokens; returns the text that became stable ("" if none)."""
        if not self._skipped.isdisjoint(token_ids):  # C-speed check; filtering is the rare case
            token_ids = [t for t in token_ids if t not in self._skipped]
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        text = self._decode(self._ids)
        if text.endswith(_REPLACEMENT):
            # The last token ends inside a character: wait for the tokens that complete it.
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Emits the held-back tail as it decodes now (call once the request has finished)."""
        if self._read == len(self._ids):
            return ""
        return self._emit(self._decode(self._ids))

    def _seed(self, prompt_ids: Sequence[int]) -> tuple[list[int], str]:
        """The window's first context: the last few prompt tokens that render cleanly.

        Their text is checked against the text of the last 24 prompt tokens, or of the whole
        prompt when that piece itself starts badly (inside a run of byte-fallback tokens, which
        then renders as U+FFFD). A prompt whose text ends inside a character gets no context
        (the first delta would repeat that character): the output text is decode(output_ids).
        """
        tail = [t for t in prompt_ids[-_PROMPT_LOOKBACK:] if t not in self._skipped]
        starts = range(max(len(tail) - _CONTEXT_TOKENS, 0), -1, -1)
        references = [tail] if len(prompt_ids) <= _PROMPT_LOOKBACK else [tail, list(prompt_ids)]
        for reference in references:
            text = self._decode(reference)
            if not text or text.endswith(_REPLACEMENT):
                continue
            found = _clean_start(self._decode, tail, text, starts)
            if found is not None:
                start, window_text = found
                return tail[start:], window_text
        return [], ""

    def _emit(self, text: str) -> str:
        if len(text) < len(self._read_text):
            return ""  # a decoder that renders less with more tokens: wait for more (vLLM does)
        delta = text[len(self._read_text) :]
        self._read, self._read_text = len(self._ids), text
        if delta:
            self._parts.append(delta)
        if len(self._ids) >= self._slide_at:
            self._slide()
        return delta

    def _slide(self) -> None:
        """Drops all but the last few tokens of a fully read window, so decode cost stays flat."""
        n = len(self._ids)
        first = n - _CONTEXT_TOKENS
        starts = range(first, max(first - _SLIDE_TRIES, 0), -1)
        found = _clean_start(self._decode, self._ids, self._read_text, starts)
        if found is None:
            self._slide_at = n + _CONTEXT_TOKENS  # no clean start yet (rare): retry later
            return
        start, window_text = found
        del self._ids[:start]
        self._read, self._read_text = len(self._ids), window_text
        self._slide_at = _MAX_WINDOW_TOKENS


@dataclass(frozen=True)
class StopMatch:
    """A completed stop string; it starts `chars_from_end` characters before the text's end."""

    stop: str
    chars_from_end: int


class StopStringMatcher:
    """Finds stop strings in text that arrives in pieces.

    Guarantees: `feed` reports the stop string that completes first in the character stream
    (ties: the one that starts earlier), at the feed that completes it, even when it spans many
    pieces. Each feed scans only the last (longest stop - 1) characters seen plus the new text.
    `partial_len` is how many characters at the end could still become a stop string: streaming
    must withhold them.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty; got {list(stop)!r}")
        self.stop = tuple(dict.fromkeys(stop))
        self._keep = max(map(len, self.stop), default=1) - 1
        self._tail = ""  # the last `_keep` characters fed: all an unfinished match can hold
        # Proper prefixes of the stop strings by their last character, longest first, so that
        # partial_len looks only at the prefixes that could end the text.
        prefixes: dict[str, set[str]] = {}
        for s in self.stop:
            for k in range(1, len(s)):
                prefixes.setdefault(s[k - 1], set()).add(s[:k])
        self._prefixes = {c: sorted(p, key=len, reverse=True) for c, p in prefixes.items()}

    def feed(self, text: str, check: bool = True) -> StopMatch | None:
        """Adds `text`; returns the first stop string it completes (only when `check`)."""
        window = self._tail + text
        old = len(self._tail)
        self._tail = window[-self._keep :] if self._keep else ""
        if not check or not self.stop:
            return None
        found = []
        for s in self.stop:
            # Only matches that end in the new text count (one inside the old tail was seen
            # before, or came while checks were off); the first such one completes first.
            if s not in window:  # the common case, and 5x cheaper than the find below
                continue
            start = window.find(s, max(old - len(s) + 1, 0))
            if start >= 0:
                found.append((start + len(s), start, s))
        if not found:
            return None
        _, start, stop = min(found)  # the earliest end; then the earliest start
        return StopMatch(stop=stop, chars_from_end=len(window) - start)

    def partial_len(self) -> int:
        """Length of the longest end of the text fed so far that is a proper prefix of a stop."""
        tail = self._tail
        if not tail:
            return 0
        for prefix in self._prefixes.get(tail[-1], ()):
            if tail.endswith(prefix):
                return len(prefix)
        return 0


class OutputText:
    """The output text of one request: incremental detokenization plus stop strings.

    Used by the scheduler (ends the request at once on a stop string) and by the streaming side
    (sends only text that can no longer turn into a stop string); both see the same text.
    Without stop strings nothing needs the text per token, so `append` only collects the ids
    and the text is decoded when it is read (in one window; same result, ~0.1 us per token).

    Guarantees:
    - `append` returns the matched stop string at the call whose tokens complete it; from then on
      `text` is frozen, cut right before the stop string (or right after it with
      include_stop_str_in_output), and further appends are ignored.
    - `streamable_len` only grows and never covers a character that a later stop cut removes:
      what was streamed is always a prefix of the final `text`.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._detok = IncrementalDetokenizer(
            tokenizer, prompt_ids, skip_special_tokens, spaces_between_special_tokens
        )
        self._matcher = StopStringMatcher(stop)
        self._include_stop = include_stop_str_in_output
        self.stop_str: str | None = None  # the stop string that ended the text, if any
        self.finished = False
        self._parts: list[str] = []
        self._len = 0
        self._held = 0  # characters at the end of the text withheld from streaming
        self._streamed = 0
        self._unstreamed = ""  # text[_streamed:], kept so stream_delta costs O(delta)
        self._undecoded: list[int] = []  # ids not yet detokenized (only without stop strings)

    @property
    def text(self) -> str:
        """The output text so far (joins lazily: read it at the end or rarely)."""
        self._catch_up()
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def streamable_len(self) -> int:
        """How many leading characters of `text` are safe to stream now."""
        self._catch_up()
        return self._len - self._held

    def streamable_text(self) -> str:
        """The prefix of `text` that is safe to stream now (O(text); prefer `stream_delta`)."""
        return self.text[: self.streamable_len]

    def stream_delta(self) -> str:
        """The safe text not returned by an earlier call (O(new text)); for one streaming reader."""
        n = self.streamable_len - self._streamed
        delta, self._unstreamed = self._unstreamed[:n], self._unstreamed[n:]
        self._streamed += n
        return delta

    def append(self, token_ids: Sequence[int], check_stop: bool = True) -> str | None:
        """Adds generated tokens; returns the stop string if one is (or was) matched.

        Pass check_stop=False while the request is below min_tokens: stop strings are then not
        matched (vLLM's rule), though a possible beginning of one is still withheld from streams.
        """
        if self.stop_str is not None or self.finished:
            return self.stop_str
        if not self._matcher.stop:
            self._undecoded.extend(token_ids)
            return None
        return self._add(self._detok.append(token_ids), check_stop)

    def finish(self, check_stop: bool = True) -> str | None:
        """Flushes held-back bytes at the end of the request and releases all text to streams."""
        if not self.finished and self.stop_str is None:
            self._catch_up()
            self._add(self._detok.flush(), check_stop)
        self.finished = True
        self._held = 0
        return self.stop_str

    def _catch_up(self) -> None:
        if self._undecoded:
            ids, self._undecoded = self._undecoded, []
            self._add(self._detok.append(ids), check_stop=False)

    def _add(self, delta: str, check_stop: bool) -> str | None:
        if not delta:
            return None
        self._parts.append(delta)
        self._len += len(delta)
        self._unstreamed += delta
        match = self._matcher.feed(delta, check_stop)
        if match is None:
            self._held = self._matcher.partial_len()
            return None
        cut = self._len - match.chars_from_end + (len(match.stop) if self._include_stop else 0)
        self._cut(cut)
        self.stop_str = match.stop
        return match.stop

    def _cut(self, cut: int) -> None:
        """Truncates the text at `cut`, a position streaming has not passed."""
        assert cut >= self._streamed, f"stop cut at {cut} but {self._streamed} chars were streamed"
        self._parts = ["".join(self._parts)[:cut]]
        self._len, self._held = cut, 0
        self._unstreamed = self._unstreamed[: cut - self._streamed]
