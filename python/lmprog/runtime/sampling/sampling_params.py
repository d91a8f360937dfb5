"""User-facing sampling parameters (vLLM's names), validated where they are created.

This module must import without torch: the API process and client programs build and
validate `SamplingParams` long before any tensor exists.

Validation is split in two:

- `__post_init__` checks what needs no model (ranges, types, `min_tokens <= max_tokens`)
  and normalises the loose input forms (`stop="x"` -> `["x"]`, `top_k=0` -> `-1`, ...);
- `validate_for_model` checks what needs the model (token ids inside the vocabulary,
  the server's logprobs limit).

Every error is a `ValueError` (wrong types too: one exception type for the server to map
to a 400) that names the field, the value and the limit; precisely a `ParamError`, whose
`param` is the field (its message starts with the field's name).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any

from lmprog.runtime.sampling.param_error import ParamError

# Temperatures below this are greedy decoding (argmax), as in vLLM: dividing logits by a
# tiny temperature only overflows, and the limit of sampling as T -> 0 is the argmax anyway.
GREEDY_TEMPERATURE = 1e-5

# Output constraints; a request sets at most one.
_CONSTRAINTS = ("regex", "json_schema", "json_object", "ebnf", "choice", "structural_tag")

# Penalty limits follow the OpenAI API (presence/frequency in [-2, 2]) and vLLM
# (repetition > 0, where 1 means off).
_PENALTY_LIMIT = 2.0

# OpenAI's logit_bias range: -100 effectively bans a token, +100 effectively forces it.
_LOGIT_BIAS_LIMIT = 100.0


class RequestOutputKind(Enum):
    """What a streaming engine (`AsyncLLM.generate`) yields for a request, as vLLM names it:
    each output holds everything generated so far (CUMULATIVE), only what is new since the
    previous output (DELTA), or there is one output, when the request ends (FINAL_ONLY). The
    offline `LLM` returns finished outputs whatever this says."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """How to pick each next token of one request, and when to stop.

    Fields (vLLM semantics):
        n: number of completions to return for the prompt (>= 1).
        presence_penalty: subtracted once from the logit of every token that already
            appears in the output; in [-2, 2]; 0 is off.
        frequency_penalty: subtracted from a token's logit once per occurrence in the
            output; in [-2, 2]; 0 is off.
        repetition_penalty: for tokens in the prompt or the output, positive logits are
            divided by it and negative ones multiplied; > 0; 1 is off.
        temperature: logits are divided by it before sampling; 0 (anything below 1e-5)
            means greedy: the argmax, with top_p/top_k/min_p reset to off.
        top_p: keep the smallest set of most likely tokens whose mass reaches top_p
            (after top_k); in (0, 1]; 1 is off.
        top_k: keep the k most likely tokens; -1 (or 0, stored as -1) is off.
        min_p: drop tokens whose probability is below min_p times the top token's;
            in [0, 1]; 0 is off.
        seed: per-request seed; the same seed, prompt and parameters give the same
            output regardless of what else is in the batch. None: the engine picks one.
        stop: strings that end the generation (not included in the output unless
            include_stop_str_in_output). A single string is accepted; stored as a list.
        stop_token_ids: token ids that end the generation (the token is kept in
            output_ids but, if special, is not detokenized).
        ignore_eos: keep generating after the EOS token.
        max_tokens: the most tokens to generate (>= 1); None means up to the model's
            context length.
        min_tokens: EOS and stop_token_ids are forbidden until this many tokens exist.
        logit_bias: {token id: bias in [-100, 100]} added to those tokens' logits before
            anything else (penalties, min_tokens, temperature, top_k/top_p/min_p, and the
            argmax of greedy rows all see the biased logits), as in OpenAI's API: -100
            effectively bans a token, +100 effectively forces it. Keys may be strings of
            digits (JSON objects have string keys); they are stored as ints. It does not
            change logprobs (computed from the raw logits, like penalties), cannot undo the
            min_tokens or grammar masks (-inf stays -inf), and does not apply to tokens a
            grammar forces by jump-forward (they are appended without sampling).
        logprobs: also return this many top log-probabilities per generated token,
            besides the chosen token's own (0: only the chosen token's); None: none.
        prompt_logprobs: return the log-probability of each prompt token given the ones
            before it, plus this many top alternatives per position (0: only the prompt
            token's own); None: none. Prompt tokens whose logprobs are asked for are
            computed, not taken from the prefix cache.
        skip_special_tokens: leave special tokens out of the detokenized text.
        spaces_between_special_tokens: put spaces between special tokens when they are
            detokenized.
        include_stop_str_in_output: keep the matched stop string in the output text.
        regex / json_schema / json_object / ebnf / choice / structural_tag: constrain the
            output (at most one): to match a regex, to be JSON valid against a schema (a dict
            or JSON text), to be any JSON object, to follow an EBNF grammar (with a `root`
            rule), to be exactly one of the given strings, or to follow an xgrammar structural
            tag (JSON text; the chat route builds one to enforce tool calls). The sequence
            ends when the grammar is complete.
        output_kind: what `AsyncLLM.generate` yields (RequestOutputKind; its int value is
            accepted too): cumulative outputs (the default), deltas, or only the final one.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    regex: str | None = None
    json_schema: str | dict | None = None
    json_object: bool = False
    ebnf: str | None = None
    choice: list[str] | None = None
    structural_tag: str | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        with _naming_the_field():
            self._normalise()
            self._validate_ranges()
        if self.is_greedy:
            # Truncation is meaningless for the argmax; resetting it (as vLLM does) lets
            # the batch treat every greedy row alike.
            self.top_p, self.top_k, self.min_p = 1.0, -1, 0.0

    # -- derived values -------------------------------------------------------------------

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax (temperature below 1e-5)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def is_constrained(self) -> bool:
        """True when a grammar (regex, JSON, EBNF, choice or structural tag) constrains the output."""
        return any(getattr(self, name) for name in _CONSTRAINTS)

    @property
    def uses_penalties(self) -> bool:
        """True when any of presence/frequency/repetition penalty is not the no-op value."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def uses_logit_bias(self) -> bool:
        """True when logit_bias has at least one entry."""
        return bool(self.logit_bias)

    # -- model-dependent checks --------------------------------------------------------------

    def validate_for_model(self, vocab_size: int, max_logprobs: int = 20) -> None:
        """Check what needs the model: stop_token_ids and logit_bias ids inside the
        vocabulary, and logprobs within the server's limit. Raises ValueError."""
        with _naming_the_field():
            self._validate_for_model(vocab_size, max_logprobs)

    def _validate_for_model(self, vocab_size: int, max_logprobs: int) -> None:
        for token_id in self.stop_token_ids:
            if token_id >= vocab_size:
                raise ValueError(
                    f"stop_token_ids contains {token_id}, outside the vocabulary "
                    f"(ids must be < {vocab_size})"
                )
        for token_id in self.logit_bias or ():
            if token_id >= vocab_size:
                raise ValueError(
                    f"logit_bias has token id {token_id}, outside the vocabulary "
                    f"(ids must be < {vocab_size})"
                )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > max_logprobs:
                raise ValueError(
                    f"{name} must be <= {max_logprobs} (the server's max_logprobs), got {value}"
                )

    # -- copies ----------------------------------------------------------------------------------

    def clone(self) -> SamplingParams:
        """An independent copy (lists and logit_bias are copied too)."""
        return self.with_overrides()

    def with_overrides(self, **changes: Any) -> SamplingParams:
        """A validated copy with some fields replaced, e.g. `with_overrides(max_tokens=1)`."""
        return dataclasses.replace(self, **changes)

    # -- helpers -------------------------------------------------------------------------------

    def _normalise(self) -> None:
        if self.top_k == 0:
            self.top_k = -1
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if self.logit_bias is not None:
            self.logit_bias = _normalised_logit_bias(self.logit_bias)
        for name in (
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "temperature",
            "top_p",
            "min_p",
        ):
            setattr(self, name, _as_float(name, getattr(self, name)))
        self.output_kind = _output_kind(self.output_kind)

    def _validate_ranges(self) -> None:
        _check_int("n", self.n, minimum=1)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -_PENALTY_LIMIT <= value <= _PENALTY_LIMIT:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if math.isinf(self.temperature):
            raise ValueError(f"temperature must be finite, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, minimum=-1)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _check_int("seed", self.seed)
        self._validate_stops()
        self._validate_logit_bias()
        self._validate_lengths()
        self._validate_constraint()
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=0)
        for name in (
            "ignore_eos",
            "skip_special_tokens",
            "spaces_between_special_tokens",
            "include_stop_str_in_output",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")  # noqa: TRY004

    def _validate_constraint(self) -> None:
        given = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) > 1:
            raise ValueError(f"give at most one output constraint, got {given}")
        for name in ("regex", "ebnf", "structural_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if self.json_schema is not None and not isinstance(self.json_schema, (str, dict)):
            raise ValueError(
                f"json_schema must be a JSON Schema (an object or its JSON text), "
                f"got {type(self.json_schema).__name__}"
            )
        if not isinstance(self.json_object, bool):
            raise ValueError(f"json_object must be a bool, got {self.json_object!r}")  # noqa: TRY004
        if self.choice is not None:
            choice = self.choice
            if not isinstance(choice, list) or not choice:
                raise ValueError(f"choice must be a non-empty list of strings, got {choice!r}")
            bad = [c for c in choice if not isinstance(c, str) or not c]
            if bad:
                raise ValueError(f"choice must contain non-empty strings, got {bad[0]!r}")

    def _validate_stops(self) -> None:
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop must contain non-empty strings, got {stop!r}")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, minimum=0)

    def _validate_logit_bias(self) -> None:
        for token_id, bias in (self.logit_bias or {}).items():
            if token_id < 0:
                raise ValueError(f"logit_bias has token id {token_id}; ids must be >= 0")
            if not -_LOGIT_BIAS_LIMIT <= bias <= _LOGIT_BIAS_LIMIT:
                raise ValueError(
                    f"logit_bias for token id {token_id} must be in [-100, 100], got {bias}"
                )

    def _validate_lengths(self) -> None:
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} "
                f"> max_tokens={self.max_tokens}"
            )


def _normalised_logit_bias(logit_bias: object) -> dict[int, float]:
    """A fresh {int id: float bias} from a mapping whose keys are ints or strings of digits
    (JSON objects, e.g. OpenAI's {"50256": -100}, only have string keys)."""
    if not isinstance(logit_bias, dict):
        raise ValueError(  # noqa: TRY004
            f"logit_bias must be a map of token id to bias, got {type(logit_bias).__name__}"
        )
    normalised: dict[int, float] = {}
    for key, bias in logit_bias.items():
        token_id = _token_id(key)
        if token_id in normalised:
            raise ValueError(f"logit_bias has token id {token_id} more than once")
        normalised[token_id] = _as_float(f"logit_bias for token id {token_id}", bias)
    return normalised


def _token_id(key: object) -> int:
    """A logit_bias key as an int: an int (not a bool), or a string of digits. A leading
    minus is accepted so that "-1" gets the range error (ids >= 0), not a type error."""
    if isinstance(key, str) and re.fullmatch(r"-?[0-9]+", key):
        return int(key)
    if isinstance(key, bool) or not isinstance(key, int):
        raise ValueError(f"logit_bias keys must be integer token ids, got {key!r}")  # noqa: TRY004
    return key


_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


@contextmanager
def _naming_the_field() -> Iterator[None]:
    """Turns the ValueErrors raised inside into ParamErrors naming their field, so an API can
    say which one (`error.param`). Every message here starts with the field's name."""
    try:
        yield
    except ParamError:
        raise
    except ValueError as e:
        word = re.match(r"\w+", str(e))
        field = word.group(0) if word and word.group(0) in _FIELDS else None
        raise ParamError(str(e), field) from None


def _output_kind(value: object) -> RequestOutputKind:
    """A RequestOutputKind from itself or its int value (not a bool)."""
    if isinstance(value, RequestOutputKind):
        return value
    kinds = {k.value: k for k in RequestOutputKind}
    if isinstance(value, int) and not isinstance(value, bool) and value in kinds:
        return kinds[value]
    names = ", ".join(f"{k.name} ({k.value})" for k in RequestOutputKind)
    raise ValueError(f"output_kind must be a RequestOutputKind: {names}; got {value!r}")


def _as_float(name: str, value: object) -> float:
    """Accept ints and floats (not bools, not NaN) for a float field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")  # noqa: TRY004
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got nan")
    return value


def _check_int(name: str, value: object, minimum: int | None = None) -> None:
    """Raise unless value is an int (not a bool) and, when given, at least `minimum`.

    top_k is the one field whose minimum (-1) is a sentinel, so its message says so."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")  # noqa: TRY004
    if minimum is None or value >= minimum:
        return
    if name == "top_k":
        raise ValueError(f"top_k must be -1 or 0 (off) or >= 1, got {value}")
    if minimum == 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
