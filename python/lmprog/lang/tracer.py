"""The constant prefix of a program: the text it writes before it uses an argument or calls
the model. run_batch prefills it once, so every run of the batch finds it in the radix cache.

The program runs on a tracing state: arguments are stand-ins that stop the trace when they are
used (formatted into text or appended), and the tracing backend stops it at the first gen,
select or fork. Whatever text (role prefixes included) was written by then is the prefix.
"""

from __future__ import annotations

from typing import Any

from lmprog.lang.interpreter import StreamExecutor
from lmprog.lang.ir import GenParams, TraceStop
from lmprog.lang.state import ProgramState


class TracedArgument:
    """Stands in for an argument; any use as text ends the trace."""

    _lmprog_traced = True

    def __init__(self, name: str) -> None:
        self.name = name

    def _stop(self, *_: Any) -> Any:
        raise TraceStop(self.name)

    __str__ = __format__ = __add__ = __radd__ = __getitem__ = __iter__ = __len__ = _stop
    __getattr__ = _stop


class _TracingBackend:
    def __init__(self, chat_template: Any) -> None:
        self.chat_template = chat_template

    def _stop(self, *_: Any, **__: Any) -> Any:
        raise TraceStop("the model is called")

    generate = select = fork_prefill = _stop


def trace_prefix(program: Any, backend: Any) -> str:
    """The text `program` writes before its first use of an argument or of the model."""
    template = backend.get_chat_template()
    executor = StreamExecutor(
        _TracingBackend(template), {}, GenParams(), template, use_thread=False
    )
    state = ProgramState(executor)
    arguments = {name: TracedArgument(name) for name in program.arg_names}
    arguments.update(program.bind_arguments)
    try:
        program.func(state, **arguments)
    except TraceStop:
        pass
    except Exception:  # noqa: BLE001 -- a program that cannot be traced just gets no prefix
        return ""
    return executor.text_
