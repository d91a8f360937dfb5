"""The API process's side of the engine: tokenize and validate, send requests to the scheduler
process, and route its reports back to the waiting HTTP handlers.

A handler validates its requests, then `submit`s them: admission against the queue limits and
registration happen at once, and the requests go to the scheduler. One asyncio task reads the
scheduler's outbox and dispatches each message: a SeqOutput to the queue of its request, a
control reply to the future waiting for it. A request counts as in flight until the scheduler
reported the end of all its sequences, whether or not its handler is still reading. A handler
reads `outputs(state)`; if it stops early (the client went away), the request is aborted in the
scheduler and its KV freed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from lmprog.runtime.managers import codec
from lmprog.runtime.managers.io_struct import (
    AbortReq,
    BatchOutput,
    FlushCacheReq,
    FlushCacheResult,
    GetServerInfoReq,
    RequestError,
    SchedulerReady,
    SeqOutput,
    ServerInfo,
    TokenizedGenerateReqInput,
)
from lmprog.runtime.managers.prompt_bound import PromptBound
from lmprog.runtime.managers.validation import (
    ContextLengthError,
    RequestLimits,
    validate_pooling_request,
    validate_request,
)
from lmprog.runtime.sampling.sampling_params import SamplingParams
from lmprog.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)


class QueueFullError(Exception):
    """More sequences than max_running_requests + max_queued_requests would be in flight."""


class SchedulerDiedError(Exception):
    """The scheduler process is gone; nothing can be generated any more."""


class DuplicateRequestError(ValueError):
    """A client-given request id that is already in flight."""


class RequestFailedError(Exception):
    """The scheduler refused a request (`status` 400) or failed while running it (500)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


_END = object()  # put in a request's queue after its last report


@dataclass(eq=False)
class RequestState:
    """A submitted request as the API process tracks it, from `submit` until the scheduler
    reported the end of all its sequences (`ended`), whether or not a handler still reads."""

    rid: str
    n: int  # sequences the scheduler reports the end of
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: int = 0
    ended: bool = False
    prompt_text: str | None = None  # for the dashboard's recent requests


def _sequences(req: TokenizedGenerateReqInput) -> int:
    return 1 if req.prefill_only else req.sampling_params.n


class TokenizerManager:
    def __init__(
        self,
        server_args: ServerArgs,
        ready: SchedulerReady,
        tokenizer: Any,
        inbox_addr: str,
        outbox_addr: str,
    ) -> None:
        self.server_args = server_args
        self.model_info = ready
        self.tokenizer = tokenizer
        ctx = zmq.asyncio.Context()
        self._to_scheduler = ctx.socket(zmq.PUSH)
        self._to_scheduler.bind(inbox_addr)
        self._from_scheduler = ctx.socket(zmq.PULL)
        self._from_scheduler.bind(outbox_addr)
        self._states: dict[str, RequestState] = {}
        self._sequences_in_flight = 0
        self._control: dict[type, asyncio.Future] = {}
        self._control_lock = asyncio.Lock()
        self._ids = itertools.count()
        self._prefix = f"{os.getpid():x}"
        self.metrics: Any = None  # entrypoints.metrics.Metrics, set by the server
        self.dashboard: Any = None  # entrypoints.dashboard.history.DashboardHistory, idem
        self.alive = True
        self._loop_task: asyncio.Task | None = None
        self._bound = PromptBound(tokenizer)

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._dispatch_loop())

    # ---- requests -------------------------------------------------------------------------
    def new_rid(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    @property
    def limits(self) -> RequestLimits:
        info, args = self.model_info, self.server_args
        return RequestLimits(
            vocab_size=info.vocab_size,
            context_len=info.context_len,
            max_total_tokens=info.max_total_tokens,
            page_size=args.page_size,
            max_logprobs=args.max_logprobs,
            max_running_requests=args.max_running_requests,
        )

    async def tokenize(
        self, text: str, add_special_tokens: bool = True, within_context: bool = True
    ) -> list[int]:
        """Token ids of `text`, computed off the event loop (a long text takes seconds, and
        every other connection must go on meanwhile). `within_context`: a text that cannot
        fit the model's context is refused at once, without tokenizing it."""
        if within_context:
            self.check_length_bound(text)
        return await asyncio.to_thread(
            self.tokenizer.encode, text, add_special_tokens=add_special_tokens
        )

    def check_length_bound(self, text: str) -> None:
        """Raises ContextLengthError if `text` certainly has more tokens than the context."""
        least, context = self._bound.at_least(text), self.model_info.context_len
        if least >= context:
            raise ContextLengthError(
                f"prompt has at least {least} tokens ({len(text)} characters); the model's "
                f"context is {context} tokens (max_model_len)"
            )

    def validate(self, input_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError naming the field, value and limit (nothing is sent). Over-long
        requests are refused (HTTP semantics), not cut to the context."""
        info = self.model_info
        if info.is_embedding:
            # The scheduler also checks a decoder embedder's KV pool.
            validate_pooling_request(input_ids, info.vocab_size, info.context_len, None)
            return
        validate_request(input_ids, params, self.limits, strict_length=True)

    def submit(
        self,
        reqs: list[TokenizedGenerateReqInput],
        stream: bool = False,
        check_capacity: bool = True,
    ) -> list[RequestState]:
        """Admits and sends validated requests, all or none. Checking the limits and
        registering happen with no await in between, so concurrent handlers cannot overshoot
        them. Raises SchedulerDiedError, DuplicateRequestError or QueueFullError."""
        if not self.alive:
            raise SchedulerDiedError("the scheduler process has exited")
        rids = [r.rid for r in reqs]
        taken = [rid for rid in rids if rid in self._states]
        if taken or len(set(rids)) < len(rids):
            rid = taken[0] if taken else next(r for r in rids if rids.count(r) > 1)
            raise DuplicateRequestError(
                f"request id (rid) {rid!r} is already in flight; give each request its own"
            )
        seqs = sum(_sequences(r) for r in reqs)
        if check_capacity:
            self._check_capacity(seqs)
        states = []
        for req in reqs:
            state = RequestState(req.rid, _sequences(req), prompt_text=req.input_text)
            self._states[req.rid] = state
            self._sequences_in_flight += state.n
            states.append(state)
            message = dataclasses.replace(req, stream=True) if stream else req
            # Not awaited: a PUSH socket queues it in order, and nothing may interleave here.
            self._to_scheduler.send(codec.encode(message))
        return states

    def _check_capacity(self, seqs: int) -> None:
        args = self.server_args
        if args.max_queued_requests is None:
            return
        limit = args.max_running_requests + args.max_queued_requests
        if self._sequences_in_flight + seqs > limit:
            raise QueueFullError(
                f"{self._sequences_in_flight} sequences in flight and this request has {seqs}; "
                f"the server takes at most {limit} (max_running_requests "
                f"{args.max_running_requests} + max_queued_requests {args.max_queued_requests})"
            )

    async def outputs(self, state: RequestState) -> AsyncIterator[SeqOutput]:
        """A submitted request's reports until all its sequences ended. Raises
        RequestFailedError or SchedulerDiedError. Leaving early aborts the request."""
        try:
            while True:
                item = await state.queue.get()
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            if not state.ended and self.alive:
                # No await here: this also runs when the handler's task is being cancelled.
                self._to_scheduler.send(codec.encode(AbortReq(state.rid)))

    async def generate(self, req: TokenizedGenerateReqInput) -> AsyncIterator[SeqOutput]:
        """Runs one request outside the queue limits (the server's own probes)."""
        (state,) = self.submit([req], check_capacity=False)
        async for out in self.outputs(state):
            yield out

    def abort(self, rid: str) -> bool:
        """Aborts request `rid` if it is in flight (its handler sees finish_reason 'abort')."""
        if rid not in self._states:
            return False
        self._to_scheduler.send(codec.encode(AbortReq(rid)))
        return True

    def abort_all(self) -> int:
        """Aborts every request in flight; returns how many."""
        rids = list(self._states)
        for rid in rids:
            self.abort(rid)
        return len(rids)

    @property
    def sequences_in_flight(self) -> int:
        return self._sequences_in_flight

    # ---- control --------------------------------------------------------------------------
    async def flush_cache(self) -> bool:
        return (await self._ask(FlushCacheReq(), FlushCacheResult)).success

    async def get_server_info(self, cache_tree: bool = False) -> ServerInfo:
        return await self._ask(GetServerInfoReq(cache_tree), ServerInfo)

    async def _ask(self, request: Any, reply_type: type) -> Any:
        if not self.alive:
            raise SchedulerDiedError("the scheduler process has exited")
        async with self._control_lock:
            future = asyncio.get_running_loop().create_future()
            self._control[reply_type] = future
            await self._send(request)
            return await asyncio.wait_for(future, timeout=30)

    # ---- plumbing -------------------------------------------------------------------------
    async def _send(self, message: Any) -> None:
        await self._to_scheduler.send(codec.encode(message))

    async def _dispatch_loop(self) -> None:
        """Routes the scheduler's messages. A message that cannot be routed is logged and
        skipped: one bad report must not stop every other request's."""
        while True:
            raw = await self._from_scheduler.recv()
            try:
                self._dispatch(codec.decode(raw))
            except Exception:  # logged; the loop serves the rest
                logger.exception("could not route a message from the scheduler")

    def _dispatch(self, message: Any) -> None:
        if isinstance(message, BatchOutput):
            for out in message.outputs:
                state = self._states.get(out.rid)
                if state is None:
                    continue
                state.queue.put_nowait(out)
                if out.finish_reason is not None:
                    state.finished += 1
                    if self.metrics is not None:
                        self.metrics.finished(out)
                    if self.dashboard is not None:
                        self.dashboard.finished(out, state.prompt_text)
                    if state.finished == state.n:
                        self._end(state)
        elif isinstance(message, RequestError):
            state = self._states.get(message.rid)
            if state is not None:
                state.queue.put_nowait(RequestFailedError(message.message, message.status))
                self._end(state)
        else:
            future = self._control.pop(type(message), None)
            if future is not None and not future.done():
                future.set_result(message)

    def _end(self, state: RequestState) -> None:
        """The scheduler holds nothing more of this request: it leaves the in-flight count."""
        state.ended = True
        del self._states[state.rid]
        self._sequences_in_flight -= state.n
        state.queue.put_nowait(_END)

    def scheduler_died(self) -> None:
        """Fails every request in flight; called by the server's watchdog."""
        self.alive = False
        for state in list(self._states.values()):
            state.queue.put_nowait(SchedulerDiedError("the scheduler process has exited"))
            self._end(state)
        for future in self._control.values():
            if not future.done():
                future.set_exception(SchedulerDiedError("the scheduler process has exited"))
