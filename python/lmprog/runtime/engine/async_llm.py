"""AsyncLLM: the streaming engine, with vLLM V1's API.

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model="smollm2-135m-instruct"))
    params = SamplingParams(max_tokens=64, output_kind=RequestOutputKind.DELTA)
    async for output in engine.generate("Hello, my name is", params, request_id="r1"):
        print(output.outputs[0].text, end="")
    engine.shutdown()

The Scheduler runs in a background thread (engine_thread.py) and each request's outputs go to
the event loop that iterates its generator (request_stream.py), so every generator on the
engine, from any event loop, shares its continuous batching.

A request is live from its generator's first iteration until the engine has reported its end;
while it is live its id is taken. It ends when it finishes, when `abort(request_id)` is called
(its last output has finish_reason 'abort'), or when its reader leaves the `async for` early
(break, cancellation, an exception), which aborts it. Either way the scheduler frees its KV.
A bad request raises ValueError from `generate` before it is enqueued, and nothing else is
affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from lmprog.runtime.engine.engine_args import AsyncEngineArgs
from lmprog.runtime.engine.engine_thread import EngineThread, Reports
from lmprog.runtime.engine.exceptions import EngineDeadError
from lmprog.runtime.engine.outputs import RequestOutput
from lmprog.runtime.engine.prompts import PromptType, tokenize_prompt
from lmprog.runtime.engine.request_stream import RequestStream
from lmprog.runtime.managers.io_struct import (
    RequestError,
    TokenizedGenerateReqInput,
    internal_error,
)
from lmprog.runtime.managers.scheduler import Scheduler
from lmprog.runtime.managers.validation import validate_request
from lmprog.runtime.sampling.sampling_params import SamplingParams

T = TypeVar("T")
logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Live:
    """A live request, as the engine thread routes its reports."""

    stream: RequestStream
    loop: asyncio.AbstractEventLoop
    unfinished: int  # sequences whose end the engine has not reported

    def ends_with(self, reports: Reports) -> bool:
        for item in reports:
            if isinstance(item, RequestError):
                return True
            if item.finish_reason is not None:
                self.unfinished -= 1
        return self.unfinished == 0

    def deliver(self, reports: list[Any]) -> bool:
        """Hands reports to the request's event loop; False if that loop is closed."""
        try:
            self.loop.call_soon_threadsafe(self.stream.add, reports)
        except RuntimeError:  # the loop is closed: nobody will read this request
            return False
        return True


class AsyncLLM:
    """A streaming engine over one generation model (see the module docstring)."""

    def __init__(self, engine_args: AsyncEngineArgs) -> None:
        self.server_args = engine_args.server_args
        scheduler = Scheduler(self.server_args)
        if scheduler.is_embedding:
            raise ValueError(
                f"{self.server_args.model_path} is loaded as an embedding model; AsyncLLM "
                "generates: use LLM(...).embed() for embeddings"
            )
        self.tokenizer = scheduler.tokenizer
        self._limits = scheduler.limits
        self._requests: dict[str, _Live] = {}
        self._lock = threading.Lock()  # guards _requests and _closed (event loops + engine)
        self._closed = False
        self._engine = EngineThread(scheduler, self._route, self._engine_exited)

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs) -> AsyncLLM:
        return cls(engine_args)

    # ---- requests -------------------------------------------------------------------------
    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None,
        request_id: str,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yields the request's RequestOutputs as its tokens arrive (see RequestOutputKind);
        the last has `finished=True`. `prompt`: a string, token ids, or `{"prompt": ...}` /
        `{"prompt_token_ids": ...}`. Raises ValueError for a bad request or a request id
        that is live, EngineDeadError after shutdown, EngineGenerateError if the engine
        fails while running it."""
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string, got {request_id!r}")  # noqa: TRY004
        text, ids = tokenize_prompt(self.tokenizer, prompt)
        validate_request(ids, params, self._limits)
        stream = RequestStream(request_id, text, ids, params, self.tokenizer)
        live = _Live(stream, asyncio.get_running_loop(), params.n)
        self._start(live, TokenizedGenerateReqInput(request_id, ids, params, text, stream=True))
        try:
            while (output := await stream.next_output()) is not None:
                yield output
        finally:
            # No await here: this also runs when the reader's task is being cancelled.
            self._abort_if_live(live)

    async def abort(self, request_id: str | Iterable[str]) -> None:
        """Aborts live requests: their generators end with finish_reason 'abort'. Returns once
        the engine has taken the abort (no token is generated for them after that); unknown
        or ended ids are ignored."""
        rids = [request_id] if isinstance(request_id, str) else list(request_id)

        def abort(sched: Scheduler) -> None:
            for rid in rids:
                sched.abort_request(rid)

        if self.is_running:
            with contextlib.suppress(EngineDeadError):  # stopped meanwhile: nothing is live
                await self._ask(abort)

    def has_unfinished_requests(self) -> bool:
        """True while any request is live (its end not yet reported by the engine)."""
        with self._lock:
            return bool(self._requests)

    # ---- the engine -----------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return not self._closed and self._engine.alive

    @property
    def errored(self) -> bool:
        """True if the engine thread died of an error (not a shutdown)."""
        return self._engine.error is not None

    async def get_tokenizer(self) -> Any:
        return self.tokenizer

    async def get_kv_stats(self) -> dict[str, int]:
        """KV accounting (total, free, evictable, protected slots; running/waiting requests)."""
        return await self._ask(lambda sched: sched.kv_stats())

    async def get_scheduler_stats(self) -> dict[str, float]:
        """The scheduler's counters since start (steps, tokens, prefix-cache hits)."""

        def counters(sched: Scheduler) -> dict[str, float]:
            stats = sched.stats
            return dataclasses.asdict(stats) | {"cache_hit_rate": stats.cache_hit_rate}

        return await self._ask(counters)

    async def reset_prefix_cache(self) -> bool:
        """Drops every cached prefix; False while requests run."""
        return await self._ask(lambda sched: sched.flush_cache())

    async def check_integrity(self) -> None:
        """Asserts the KV accounting between two steps (kv_accounting.py)."""
        await self._ask(lambda sched: sched.check_integrity())

    def shutdown(self) -> None:
        """Stops the engine: live requests end with finish_reason 'abort', the background
        thread exits, and the model and KV pool are released. Idempotent; later requests
        raise EngineDeadError."""
        with self._lock:
            self._closed = True
        self._engine.stop()

    # ---- plumbing -------------------------------------------------------------------------
    async def _ask(self, fn: Callable[[Scheduler], T]) -> T:
        return await asyncio.wrap_future(self._engine.call(fn))

    def _start(self, live: _Live, req: TokenizedGenerateReqInput) -> None:
        """Registers a request and enqueues it, under one lock: its id is checked and taken
        at once, and its enqueueing cannot fall after a shutdown's stop."""
        with self._lock:
            if not self.is_running:
                raise EngineDeadError("the engine has been shut down")
            if req.rid in self._requests:
                raise ValueError(
                    f"request id {req.rid!r} is already in flight; give each request its own"
                )
            # The engine thread routes the request's reports under this lock: registering
            # after enqueueing is in time, and nothing is registered if the engine stopped.
            self._engine.submit(functools.partial(self._add, req))
            self._requests[req.rid] = live

    def _add(self, req: TokenizedGenerateReqInput, sched: Scheduler) -> None:
        """On the engine thread: a request the scheduler refuses ends with its error."""
        try:
            sched.add_request(req)
        except ValueError as e:
            self._route([RequestError(req.rid, str(e))])
        except Exception as e:  # this request fails; the engine goes on
            logger.exception("request %s could not be added", req.rid)
            self._route([RequestError(req.rid, internal_error(e).message, 500)])

    def _abort_if_live(self, live: _Live) -> None:
        rid = live.stream.request_id
        with self._lock:
            # Under the lock: a later request with the same id enqueues after this abort.
            if self._requests.get(rid) is live:
                # A stopped engine aborted it (or fails it) on its own.
                with contextlib.suppress(EngineDeadError):
                    self._engine.submit(lambda sched: sched.abort_request(rid))

    def _route(self, reports: Reports) -> None:
        """On the engine thread: each request's reports to its event loop. A request ends
        (its id is free again) with its error or the end of its last sequence."""
        by_rid: dict[str, Reports] = {}
        for item in reports:
            by_rid.setdefault(item.rid, []).append(item)
        for rid, items in by_rid.items():
            with self._lock:
                live = self._requests.get(rid)
                if live is None:
                    continue
                ended = live.ends_with(items)
                if ended:
                    del self._requests[rid]
            if not live.deliver(items) and not ended:
                self._engine.submit(lambda sched, rid=rid: sched.abort_request(rid))

    def _engine_exited(self, error: BaseException | None) -> None:
        """On the engine thread, last: requests still live fail with EngineDeadError."""
        with self._lock:
            self._closed = True
            orphans = list(self._requests.values())
            self._requests.clear()
        message = "the engine has been shut down" if error is None else f"the engine died: {error}"
        for live in orphans:
            live.deliver([EngineDeadError(message)])


AsyncLLMEngine = AsyncLLM  # vLLM's older name, which its V1 keeps as an alias
