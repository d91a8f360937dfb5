"""ProgramState: the `s` a program writes to; ProgramStateGroup: what `s.fork(n)` returns."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from lmprog.lang.interpreter import StreamExecutor
from lmprog.lang.ir import (
    ConcatAndAppend,
    ExprList,
    RoleBegin,
    RoleEnd,
    VarScopeBegin,
    VarScopeEnd,
    as_expr,
)


class ProgramState:
    def __init__(self, stream_executor: StreamExecutor) -> None:
        self.stream_executor = stream_executor
        self.ret_value: Any = None  # what the program function returned

    # ---- writing --------------------------------------------------------------------------
    def __iadd__(self, other: Any) -> ProgramState:  # noqa: PYI034
        self.stream_executor.submit(as_expr(other))
        return self

    def _role(self, role: str, expr: Any = None) -> Any:
        if expr is not None:
            self += ExprList([RoleBegin(role), as_expr(expr), RoleEnd(role)])
            return None
        return self._scoped(RoleBegin(role), RoleEnd(role))

    def system(self, expr: Any = None) -> Any:
        """`s.system("...")` appends a system turn; `with s.system():` wraps a block in one."""
        return self._role("system", expr)

    def user(self, expr: Any = None) -> Any:
        return self._role("user", expr)

    def assistant(self, expr: Any = None) -> Any:
        return self._role("assistant", expr)

    def var_scope(self, name: str) -> Any:
        """`with s.var_scope("x"):` captures everything appended inside as variable x."""
        return self._scoped(VarScopeBegin(name), VarScopeEnd(name))

    @contextlib.contextmanager
    def _scoped(self, begin: Any, end: Any) -> Iterator[None]:
        self.stream_executor.submit(begin)
        yield
        self.stream_executor.submit(end)

    def fork(self, size: int = 1) -> ProgramStateGroup:
        """`size` states continuing from this one; the backend computes the shared prefix once."""
        executor = self.stream_executor
        executor.sync()
        if hasattr(executor.backend, "fork_prefill"):
            executor.backend.fork_prefill(executor)
        return ProgramStateGroup(
            [ProgramState(executor.copy_for_fork()) for _ in range(size)], self
        )

    @contextlib.contextmanager
    def copy(self) -> Iterator[ProgramState]:
        """`with s.copy() as c:` a one-branch fork, joined (gather_variable) when the block ends."""
        forks = self.fork(1)
        try:
            yield forks[0]
        finally:
            forks.join()

    # ---- reading --------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        """`"x" in s`: waits for what was submitted first (the program runs ahead of its gens),
        so the answer does not depend on timing."""
        self.stream_executor.sync()
        return name in self.stream_executor.variables

    def get_var(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    def get_meta_info(self, name: str) -> Any:
        self.stream_executor.get_var(name)
        return self.stream_executor.meta_info.get(name)

    def text(self) -> str:
        self.stream_executor.sync()
        return self.stream_executor.text_

    def messages(self) -> list[dict[str, str]]:
        self.stream_executor.sync()
        return list(self.stream_executor.messages_)

    def sync(self) -> ProgramState:
        self.stream_executor.sync()
        return self

    def error(self) -> BaseException | None:
        return self.stream_executor.error

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """The text as it is produced (of one variable, or everything); ends with the
        program, raising its error if it failed."""
        ex = self.stream_executor
        seen = 0
        while True:
            with ex._chunks_changed:
                while seen == len(ex.chunks) and not ex.finished and ex.error is None:
                    ex._chunks_changed.wait(0.1)
                new, seen = ex.chunks[seen:], len(ex.chunks)
                done = ex.finished or ex.error is not None
            for var, text in new:
                if var_name is None or var == var_name:
                    yield text
            if done and seen == len(ex.chunks):
                if ex.error is not None:
                    raise ex.error
                return

    async def text_async_iter(self, var_name: str | None = None) -> AsyncIterator[str]:
        """text_iter for asyncio code (the waiting happens in a worker thread)."""
        it = self.text_iter(var_name)
        sentinel = object()
        while True:
            piece = await asyncio.to_thread(next, it, sentinel)
            if piece is sentinel:
                return
            yield piece

    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"


class ProgramStateGroup:
    """The states of one fork. `forks += lambda i: ...` appends per branch; `join()` waits
    for every branch and gathers its new variables into the parent as lists."""

    def __init__(self, states: list[ProgramState], src_state: ProgramState) -> None:
        self.states = states
        self.src_state = src_state

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, state: Any) -> None:
        """Python runs `forks[i] += expr` as `forks[i] = forks[i].__iadd__(expr)`: the append
        happened in place, and storing the same state back is all there is to do."""
        if state is not self.states[i]:
            raise TypeError(
                f"forks[{i}] cannot be replaced (by {type(state).__name__}): a fork's states "
                f"are fixed; append to one with forks[{i}] += ..."
            )

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> ProgramStateGroup:  # noqa: PYI034
        if callable(other):
            for i, state in enumerate(self.states):
                state += other(i)
        elif isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ValueError(f"{len(other)} expressions for {len(self.states)} forks")
            for state, expr in zip(self.states, other):
                state += expr
        else:
            for state in self.states:
                state += other
        return self

    def join(self, mode: str = "gather_variable") -> None:
        if mode == "gather_variable":
            parent = self.src_state.stream_executor
            parent.sync()
            before = set(parent.variables)
            gathered: dict[str, list[Any]] = {}
            for state in self.states:
                child = state.stream_executor
                child.sync()
                for name in child.variables:
                    if name not in before:
                        gathered.setdefault(name, []).append(child.variables[name])
            for name, values in gathered.items():
                parent.set_var(name, values)
        elif mode == "concate_and_append":
            self.src_state += ConcatAndAppend(self.states)
            self.src_state.sync()
        else:
            raise ValueError(
                f"join mode must be gather_variable or concate_and_append, got {mode!r}"
            )
        for state in self.states:
            state.stream_executor.end()
