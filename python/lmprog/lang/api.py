"""The language's public functions: what `from lmprog import function, gen, ...` gives."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from lmprog.lang.choices import ChoicesSamplingMethod
from lmprog.lang.function import SglFunction
from lmprog.lang.global_config import global_config, resolve_backend
from lmprog.lang.ir import (
    Expr,
    ExprList,
    Gen,
    GenParams,
    RoleBegin,
    RoleEnd,
    Select,
    as_expr,
    flatten,
)
from lmprog.lang.reasoning import reasoning_format


def function(
    func: Callable[..., Any] | None = None, *, num_api_spec_tokens: int | None = None
) -> Any:
    """`@function` or `@function(num_api_spec_tokens=K)` over `def program(s, ...)`."""
    if func is not None:
        return SglFunction(func, num_api_spec_tokens=num_api_spec_tokens)
    return lambda f: SglFunction(f, num_api_spec_tokens=num_api_spec_tokens)


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
    dtype: Any = None,
    regex: str | None = None,
    json_schema: str | dict | None = None,
    choices: list[str] | None = None,
    choices_method: ChoicesSamplingMethod | None = None,
    n: int | None = None,
    stop_regex: str | list[str] | None = None,
) -> Expr:
    """Generate into variable `name`. With `choices`, a select; `dtype` (int, float, bool, str)
    constrains the output to that type's regex."""
    _refuse_unsupported(n, stop_regex)
    if choices is not None:
        return select(name, choices, 0.0 if temperature is None else temperature, choices_method)
    params = GenParams(
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        stop=stop,
        stop_token_ids=stop_token_ids,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        ignore_eos=ignore_eos,
        return_logprob=return_logprob,
        logprob_start_len=logprob_start_len,
        top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs,
        dtype=dtype,
        regex=regex,
        json_schema=json_schema,
    )
    params.dtype_name  # noqa: B018 -- fails now, naming the dtype, not deep in a worker
    return Gen(name, params)


def _refuse_unsupported(n: int | None, stop_regex: Any) -> None:
    """SGLang's gen takes these too; refused here, where the program can be fixed, not later."""
    if n not in (None, 1):
        raise NotImplementedError(
            f"gen(n={n!r}) is not supported by lmprog: a gen's variable holds one completion. "
            "For several samples, fork: forks = s.fork(n); forks += gen(name); forks.join()"
        )
    if stop_regex is not None:
        raise NotImplementedError(
            "gen(stop_regex=...) is not supported by lmprog: the server stops at strings "
            "(stop=...) and token ids (stop_token_ids=...), not at regexes"
        )


def gen_int(name: str | None = None, **kwargs: Any) -> Expr:
    return gen(name, dtype=int, **kwargs)


def gen_string(name: str | None = None, **kwargs: Any) -> Expr:
    return gen(name, dtype=str, **kwargs)


def select(
    name: str | None = None,
    choices: list[str] | None = None,
    temperature: float = 0.0,
    choices_method: ChoicesSamplingMethod | None = None,
) -> Expr:
    if not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"select needs a non-empty list of strings as choices, got {choices!r}")
    return Select(name, list(choices), temperature, choices_method)


def _role(role: str, expr: Any = None) -> Expr:
    if expr is None:
        return ExprList([RoleBegin(role), RoleEnd(role)])
    return ExprList([RoleBegin(role), as_expr(expr), RoleEnd(role)])


def system(expr: Any = None) -> Expr:
    return _role("system", expr)


def user(expr: Any = None) -> Expr:
    return _role("user", expr)


def assistant(expr: Any = None) -> Expr:
    return _role("assistant", expr)


def system_begin() -> Expr:
    return RoleBegin("system")


def system_end() -> Expr:
    return RoleEnd("system")


def user_begin() -> Expr:
    return RoleBegin("user")


def user_end() -> Expr:
    return RoleEnd("user")


def assistant_begin() -> Expr:
    return RoleBegin("assistant")


def assistant_end() -> Expr:
    return RoleEnd("assistant")


def separate_reasoning(expr: Any = None, model_type: str | None = None) -> Expr:
    """`expr` with every named gen and select in it splitting the model's thinking off its value
    into the variable `<name>_reasoning_content` (formats: reasoning.py)."""
    reasoning_format(model_type)  # an unknown model_type fails here, in the program's line
    leaves = [] if expr is None else flatten(as_expr(expr))
    if not any(isinstance(leaf, (Gen, Select)) and leaf.name for leaf in leaves):
        raise ValueError(
            "separate_reasoning needs a named gen or select, e.g. "
            'separate_reasoning(gen("answer"), model_type="qwen3")'
        )
    return ExprList(
        [
            dataclasses.replace(leaf, reasoning_format=model_type)
            if isinstance(leaf, (Gen, Select)) and leaf.name
            else leaf
            for leaf in leaves
        ]
    )


def set_default_backend(backend: Any) -> None:
    global_config.default_backend = backend


def flush_cache(backend: Any = None) -> bool:
    """Drops the server's prefix cache (refused while requests run)."""
    return resolve_backend(backend).flush_cache()


def get_server_info(backend: Any = None) -> dict:
    return resolve_backend(backend).get_server_info()
