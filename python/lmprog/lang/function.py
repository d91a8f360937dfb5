"""`@function`: a Python function over a program state, run with `.run()` / `.run_batch()`."""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lmprog.lang.global_config import global_config, resolve_backend
from lmprog.lang.interpreter import StreamExecutor
from lmprog.lang.ir import GenParams
from lmprog.lang.state import ProgramState
from lmprog.lang.tracer import trace_prefix

# run()'s defaults for every gen that does not set its own (SGLang's).
RUN_DEFAULTS = {
    "max_new_tokens": 128,
    "stop": None,
    "stop_token_ids": None,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "ignore_eos": False,
    "return_logprob": None,
    "logprob_start_len": None,
    "top_logprobs_num": None,
    "return_text_in_logprobs": None,
}
MIN_PREFIX_CHARS = 32  # a traced constant prefix shorter than this is not worth a prefill call


class SglFunction:
    def __init__(
        self,
        func: Callable[..., Any],
        num_api_spec_tokens: int | None = None,
        bind_arguments: dict[str, Any] | None = None,
    ) -> None:
        self.func = func
        self.num_api_spec_tokens = num_api_spec_tokens
        self.bind_arguments = bind_arguments or {}
        params = list(inspect.signature(func).parameters.values())
        if not params:
            raise TypeError(f"{func.__name__} must take the program state as its first argument")
        self.arg_names = [p.name for p in params[1:]]
        self.__name__ = func.__name__
        self.__doc__ = func.__doc__

    def bind(self, **kwargs: Any) -> SglFunction:
        return SglFunction(self.func, self.num_api_spec_tokens, {**self.bind_arguments, **kwargs})

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        return self.run(*args, **kwargs)

    def run(
        self,
        *args: Any,
        stream: bool = False,
        backend: Any = None,
        use_thread: bool = True,
        **kwargs: Any,
    ) -> ProgramState:
        """Runs the program once; returns its state (at once when `stream`: read it with
        `state.text_iter()`). Keyword arguments named like RUN_DEFAULTS set every gen's default."""
        defaults, kwargs = _split_defaults(kwargs)
        backend = resolve_backend(backend)
        executor = StreamExecutor(
            backend,
            kwargs,
            defaults,
            backend.get_chat_template(),
            stream=stream,
            num_api_spec_tokens=self.num_api_spec_tokens,
            use_thread=use_thread,
        )
        state = ProgramState(executor)
        call_args = (args, {**self.bind_arguments, **kwargs})
        if stream:
            threading.Thread(
                target=_run_program, args=(self.func, state, call_args), daemon=True
            ).start()
        else:
            _run_program(self.func, state, call_args, raise_errors=True)
        return state

    def run_batch(
        self,
        batch_kwargs: list[dict[str, Any]],
        *,
        backend: Any = None,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        **kwargs: Any,
    ) -> list[ProgramState]:
        """Runs the program once per dict of arguments, concurrently; states in input order.
        The program's constant prefix (text before any argument or gen) is prefilled once."""
        if not isinstance(batch_kwargs, list) or not all(isinstance(b, dict) for b in batch_kwargs):
            raise TypeError("run_batch takes a list of argument dicts, one per run")
        if not batch_kwargs:
            return []
        backend = resolve_backend(backend)
        if global_config.enable_precache_with_tracing and hasattr(backend, "cache_prefix"):
            prefix = trace_prefix(self, backend)
            if len(prefix) >= MIN_PREFIX_CHARS:
                backend.cache_prefix(prefix)
        if num_threads == "auto":
            num_threads = max(1, min(len(batch_kwargs), 64, 4 * (os.cpu_count() or 1)))
        bar = _progress(len(batch_kwargs)) if progress_bar else None

        def one(arguments: dict[str, Any]) -> ProgramState:
            state = self.run(backend=backend, **kwargs, **arguments)
            if bar is not None:
                bar.update(1)
            return state

        with ThreadPoolExecutor(max_workers=int(num_threads)) as pool:
            states = list(pool.map(one, batch_kwargs))
        if bar is not None:
            bar.close()
        return states


def _run_program(
    func: Callable[..., Any],
    state: ProgramState,
    call_args: tuple[tuple, dict],
    raise_errors: bool = False,
) -> None:
    args, kwargs = call_args
    executor = state.stream_executor
    try:
        state.ret_value = func(state, *args, **kwargs)
    except BaseException as e:
        if executor.error is None:
            executor.error = e
        executor.end_quietly()
        if raise_errors:
            raise
        return
    try:
        executor.end()
    except BaseException:
        if raise_errors:
            raise
        return
    if global_config.verbosity >= 2:
        print(executor.text_)  # SGLang's verbosity 2: the text of every run


def _split_defaults(kwargs: dict[str, Any]) -> tuple[GenParams, dict[str, Any]]:
    values = {k: kwargs.pop(k, v) for k, v in RUN_DEFAULTS.items()}
    values["max_tokens"] = values.pop("max_new_tokens")
    return GenParams(**values), kwargs


def _progress(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="programs")
