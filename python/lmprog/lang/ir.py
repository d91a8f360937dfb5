"""The expressions a program appends to its state: `s += <expr>`.

    "text" / Text        constant text
    Gen                  generate into a variable (sampling parameters in GenParams)
    Select               pick one of several strings by likelihood
                         (either may split the model's reasoning off its value: reasoning.py)
    RoleBegin / RoleEnd  a chat turn's boundaries (the template turns them into text)
    VarScopeBegin / End  capture everything appended in between as a variable
    ExprList             several of the above, appended in order (`a + b`)

Expressions are plain data: the executor (interpreter.py) decides what they do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The typed gens' regexes, under SGLang's names and values (programs import them from here).
# A number may end in spaces or newlines, which its stop strings then cut off: the model can
# finish a number the way it likes to instead of only with its end-of-sequence token.
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""  # a quoted run of word characters and spaces

# dtype -> (regex, stop strings): what gen(dtype=...), gen_int and gen_string constrain to.
DTYPE_REGEX: dict[str, tuple[str, list[str]]] = {
    "int": (REGEX_INT, [" ", "\n"]),
    "float": (REGEX_FLOAT, [" ", "\n"]),
    "bool": (REGEX_BOOL, []),
    "str": (REGEX_STR, []),
}


class Expr:
    """Base of every expression; `a + b` concatenates."""

    def __add__(self, other: Any) -> ExprList:
        return ExprList([self, as_expr(other)])

    def __radd__(self, other: Any) -> ExprList:
        return ExprList([as_expr(other), self])


class TraceStop(Exception):
    """Raised while tracing a program's constant prefix when it uses an argument or the model."""


def as_expr(value: Any) -> Expr:
    if isinstance(value, Expr):
        return value
    if getattr(value, "_lmprog_traced", False):
        raise TraceStop(str(getattr(value, "name", "argument")))
    if isinstance(value, str):
        return Text(value)
    raise TypeError(f"cannot append {type(value).__name__} to a program state (text or gen/select)")


@dataclass
class Text(Expr):
    value: str


@dataclass
class GenParams:
    """Sampling parameters of one gen; None means "the run's default"."""

    max_tokens: int | None = None
    min_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    ignore_eos: bool | None = None
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool | None = None
    dtype: Any = None  # int, float, bool, str (or their names): becomes a regex
    regex: str | None = None
    json_schema: str | dict | None = None

    def merged(self, defaults: GenParams) -> GenParams:
        """These values, with the unset ones taken from `defaults`."""
        values = {
            f.name: getattr(defaults, f.name)
            if getattr(self, f.name) is None
            else getattr(self, f.name)
            for f in dataclasses.fields(self)
        }
        return GenParams(**values)

    @property
    def stops(self) -> list[str]:
        stop = self.stop
        base = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        return base + (DTYPE_REGEX[self.dtype_name][1] if self.dtype_name else [])

    @property
    def dtype_name(self) -> str | None:
        if self.dtype is None:
            return None
        name = self.dtype if isinstance(self.dtype, str) else getattr(self.dtype, "__name__", "")
        if name not in DTYPE_REGEX:
            raise ValueError(f"dtype must be one of int, float, bool, str; got {self.dtype!r}")
        return name

    @property
    def effective_regex(self) -> str | None:
        """The regex a dtype stands for (it wins over an explicit regex, as in SGLang)."""
        return DTYPE_REGEX[self.dtype_name][0] if self.dtype_name else self.regex


@dataclass
class Gen(Expr):
    name: str | None
    params: GenParams = field(default_factory=GenParams)
    reasoning_format: str | None = None  # separate_reasoning's model_type (reasoning.py)


@dataclass
class Select(Expr):
    name: str | None
    choices: list[str]
    temperature: float = 0.0
    choices_method: Any = None  # a ChoicesSamplingMethod; None: token-length normalized
    reasoning_format: str | None = None


@dataclass
class RoleBegin(Expr):
    role: str


@dataclass
class RoleEnd(Expr):
    role: str


@dataclass
class VarScopeBegin(Expr):
    name: str


@dataclass
class VarScopeEnd(Expr):
    name: str


@dataclass
class ConcatAndAppend(Expr):
    """Appends the texts that forked states added since the fork (join("concate_and_append"))."""

    states: list[Any]


@dataclass
class ExprList(Expr):
    items: list[Expr]

    def __add__(self, other: Any) -> ExprList:
        return ExprList([*self.items, as_expr(other)])


def flatten(expr: Expr) -> list[Expr]:
    if isinstance(expr, ExprList):
        return [leaf for item in expr.items for leaf in flatten(item)]
    return [expr]
