"""StreamExecutor: runs one program state's expressions, in order, against a backend.

The program (user code) runs ahead: `s += gen(...)` only enqueues. A worker thread executes the
queue, so a program that forks or runs in a batch overlaps its backend calls with other work;
reading a variable (`s["answer"]`), `s.text()` or the end of the program waits for it.

State kept per executor:

    text_       the prompt so far: constant text, role prefixes/suffixes, generated text
    messages_   the chat turns so far ({"role", "content"}), for messages() and chat backends
    variables   gen/select results (and var_scope captures) by name; meta_info alongside
    chunks      (variable or None, text) pieces in order, for streaming

An exception in the worker stops the executor; it is raised to whoever waits next (a variable
read, sync, or the end of run()).
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from typing import Any

from lmprog.lang.chat_template import ChatTemplate
from lmprog.lang.ir import (
    ConcatAndAppend,
    Expr,
    Gen,
    GenParams,
    RoleBegin,
    RoleEnd,
    Select,
    Text,
    VarScopeBegin,
    VarScopeEnd,
    flatten,
)
from lmprog.lang.reasoning import split_reasoning

_END = object()  # the worker's stop signal


class StreamExecutor:
    def __init__(
        self,
        backend: Any,
        arguments: dict[str, Any],
        default_params: GenParams,
        chat_template: ChatTemplate,
        stream: bool = False,
        num_api_spec_tokens: int | None = None,
        use_thread: bool = True,
    ) -> None:
        self.backend = backend
        self.arguments = arguments
        self.default_params = default_params
        self.chat_template = chat_template
        self.stream = stream
        self.num_api_spec_tokens = num_api_spec_tokens
        self.text_ = ""
        self.messages_: list[dict[str, str]] = []
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, Any] = {}
        self.cur_role: str | None = None
        self._role_start = 0  # text_ position where the current turn's content begins
        self._scopes: dict[str, int] = {}
        self._var_events: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self.fork_start = 0  # text_ length when this state was forked (concate_and_append)
        self.error: BaseException | None = None
        self.chunks: list[tuple[str | None, str]] = []
        self._chunks_changed = threading.Condition()
        self.finished = False
        self.spec = None  # API speculative execution state, owned by the backend
        self._queue: queue.Queue = queue.Queue()
        self._thread = None
        if use_thread:
            self._thread = threading.Thread(target=self._work, daemon=True)
            self._thread.start()

    # ---- the program's side -----------------------------------------------------------------
    def submit(self, expr: Expr) -> None:
        for leaf in flatten(expr):
            if self._thread is None:
                self._run_one(leaf)
            else:
                self._queue.put(leaf)

    def sync(self) -> None:
        """Waits until everything submitted has run; raises the worker's error if any."""
        if self._thread is not None:
            self._queue.join()
        self._raise_error()

    def end(self) -> None:
        """Runs what is left, stops the worker and marks the stream finished."""
        try:
            self.sync()
        finally:
            if self._thread is not None and self._thread.is_alive():
                self._queue.put(_END)
            with self._chunks_changed:
                self.finished = True
                self._chunks_changed.notify_all()

    @property
    def open_turn_text(self) -> str:
        """The open turn's content so far ("" outside a turn)."""
        return self.text_[self._role_start :] if self.cur_role is not None else ""

    def end_quietly(self) -> None:
        """end() for a program that already failed: its error is reported elsewhere."""
        try:
            self.end()
        except BaseException:  # noqa: BLE001, S110 -- the first error is the one that counts
            pass

    def get_var(self, name: str) -> Any:
        if name in self.variables:
            return self.variables[name]
        self._var_events[name].wait()
        self._raise_error()
        if name not in self.variables:
            raise KeyError(f"the program set no variable {name!r}")
        return self.variables[name]

    def set_var(self, name: str, value: Any) -> None:
        self.variables[name] = value
        self._var_events[name].set()

    def copy_for_fork(self) -> StreamExecutor:
        """A new executor that continues from this one's text, turns and variables."""
        self.sync()
        child = StreamExecutor(
            self.backend,
            self.arguments,
            self.default_params,
            self.chat_template,
            self.stream,
            self.num_api_spec_tokens,
            use_thread=self._thread is not None,
        )
        child.text_, child.messages_ = self.text_, list(self.messages_)
        child.variables, child.meta_info = dict(self.variables), dict(self.meta_info)
        child.cur_role, child._role_start = self.cur_role, self._role_start
        child.fork_start = len(self.text_)
        return child

    # ---- the worker -------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            expr = self._queue.get()
            try:
                if expr is _END:
                    return
                if self.error is None:
                    self._run_one(expr)
            except BaseException as e:  # noqa: BLE001 -- handed to whoever waits next
                self.error = e
                for event in list(self._var_events.values()):
                    event.set()
            finally:
                self._queue.task_done()

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _run_one(self, expr: Expr) -> None:
        if isinstance(expr, Text):
            self._append(expr.value)
        elif isinstance(expr, Gen):
            self._gen(expr)
        elif isinstance(expr, Select):
            self._select(expr)
        elif isinstance(expr, RoleBegin):
            self._role_begin(expr.role)
        elif isinstance(expr, RoleEnd):
            self._role_end(expr.role)
        elif isinstance(expr, VarScopeBegin):
            self._scopes[expr.name] = len(self.text_)
        elif isinstance(expr, VarScopeEnd):
            self.set_var(expr.name, self.text_[self._scopes.pop(expr.name) :])
        elif isinstance(expr, ConcatAndAppend):
            self._concat_and_append(expr.states)
        else:
            raise TypeError(f"unknown expression {type(expr).__name__}")

    def _append(self, text: str, var: str | None = None) -> None:
        self.text_ += text
        with self._chunks_changed:
            self.chunks.append((var, text))
            self._chunks_changed.notify_all()

    def _gen(self, expr: Gen) -> None:
        params = expr.params.merged(self.default_params)
        if self.stream and hasattr(self.backend, "generate_stream"):
            pieces, meta = [], {}
            for piece, meta in self.backend.generate_stream(self, params):
                pieces.append(piece)
                self._append(piece, expr.name)
            text = "".join(pieces)
        else:
            text, meta = self.backend.generate(self, params)
            self._append(text, expr.name)
        self._record(expr.name, text, meta, expr.reasoning_format)

    def _select(self, expr: Select) -> None:
        from lmprog.lang.choices import token_length_normalized

        method = expr.choices_method or token_length_normalized
        decision = self.backend.select(self, expr.choices, expr.temperature, method)
        self._append(decision.decision, expr.name)
        self._record(expr.name, decision.decision, decision.meta_info, expr.reasoning_format)

    def _record(
        self, name: str | None, value: str, meta: Any, reasoning_format: str | None = None
    ) -> None:
        """Sets the variable; with a reasoning format, the thinking goes to its own variable
        first, so whoever waits for `name` finds both."""
        if name is None:
            return
        self.meta_info[name] = meta
        if reasoning_format is not None:
            thinking, value = split_reasoning(value, reasoning_format)
            self.set_var(f"{name}_reasoning_content", thinking)
        self.set_var(name, value)

    def _role_begin(self, role: str) -> None:
        if self.cur_role is not None:
            raise ValueError(f"{role}() began inside an open {self.cur_role} turn")
        template = self.chat_template
        if role != "system" and not self.messages_ and template.default_system_prompt:
            # What the model's own chat template does for a conversation without a system turn.
            self._role_begin("system")
            self._append(template.default_system_prompt)
            self._role_end("system")
        self._append(template.prefix(role))
        self.cur_role, self._role_start = role, len(self.text_)

    def _role_end(self, role: str) -> None:
        if self.cur_role != role:
            raise ValueError(f"{role}_end() without {role}_begin() (open turn: {self.cur_role})")
        self.messages_.append({"role": role, "content": self.text_[self._role_start :]})
        self.cur_role = None
        self._append(self.chat_template.suffix(role))
        if hasattr(self.backend, "role_end"):
            self.backend.role_end(self, role)

    def _concat_and_append(self, states: list[Any]) -> None:
        """Each fork's text since the fork, appended in order (the forks share this prefix)."""
        for state in states:
            child = state.stream_executor
            child.sync()
            self._append(child.text_[child.fork_start :])
