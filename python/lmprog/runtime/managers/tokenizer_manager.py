"""The API process's side of the engine: tokenize and validate, send requests to the scheduler
process, and route its reports back to the waiting HTTP handlers.

One asyncio task reads the scheduler's outbox and dispatches each message: a SeqOutput to the
queue of its request, a control reply to the future waiting for it. A handler iterates
`generate(...)`; if it stops early (the client went away), the request is aborted in the
scheduler and its KV freed.
"""

from __future__ import annotations

import asyncio
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
from lmprog.runtime.managers.validation import validate_embedding_request, validate_request
from lmprog.runtime.sampling.sampling_params import SamplingParams
from lmprog.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)


class QueueFullError(Exception):
    """More requests than max_running_requests + max_queued_requests are in flight."""


class SchedulerDiedError(Exception):
    """The scheduler process is gone; nothing can be generated any more."""


@dataclass
class _ReqState:
    n: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: int = 0


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
        self._states: dict[str, _ReqState] = {}
        self._control: dict[type, asyncio.Future] = {}
        self._control_lock = asyncio.Lock()
        self._ids = itertools.count()
        self._prefix = f"{os.getpid():x}"
        self.metrics: Any = None  # entrypoints.metrics.Metrics, set by the server
        self.alive = True
        self._loop_task: asyncio.Task | None = None

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._dispatch_loop())

    # ---- requests -------------------------------------------------------------------------
    def new_rid(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def validate(self, input_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError naming the field, value and limit (nothing is sent)."""
        info = self.model_info
        if info.is_embedding:
            # The scheduler also checks a decoder embedder's KV pool.
            validate_embedding_request(input_ids, info.vocab_size, info.context_len, None)
            return
        validate_request(
            input_ids,
            params,
            info.vocab_size,
            info.context_len,
            info.max_total_tokens,
            self.server_args.page_size,
            self.server_args.max_logprobs,
        )

    def check_capacity(self, new_requests: int = 1) -> None:
        if not self.alive:
            raise SchedulerDiedError("the scheduler process has exited")
        args = self.server_args
        if args.max_queued_requests is None:
            return
        limit = args.max_running_requests + args.max_queued_requests
        if len(self._states) + new_requests > limit:
            raise QueueFullError(
                f"{len(self._states)} requests in flight; the server takes at most {limit} "
                f"(max_running_requests {args.max_running_requests} + max_queued_requests "
                f"{args.max_queued_requests})"
            )

    async def generate(self, req: TokenizedGenerateReqInput) -> AsyncIterator[SeqOutput]:
        """Runs one validated request; yields its sequences' reports until all `n` ended.
        Raises ValueError if the scheduler refuses it. Leaving early aborts the request."""
        rid = req.rid
        state = _ReqState(1 if req.prefill_only else req.sampling_params.n)
        self._states[rid] = state
        done = False
        try:
            await self._send(req)
            while state.finished < state.n:
                item = await state.queue.get()
                if isinstance(item, RequestError):
                    raise ValueError(item.message)  # noqa: TRY004 -- a refused request
                if isinstance(item, SchedulerDiedError):
                    raise item
                if item.finish_reason is not None:
                    state.finished += 1
                    if self.metrics is not None:
                        self.metrics.finished(item)
                yield item
            done = True
        finally:
            self._states.pop(rid, None)
            if not done and self.alive:
                # No await here: this also runs when the handler's task is being cancelled.
                self._to_scheduler.send(codec.encode(AbortReq(rid)))

    async def abort(self, rid: str) -> bool:
        """Aborts request `rid` if it is in flight (its handler sees finish_reason 'abort')."""
        if rid not in self._states:
            return False
        await self._send(AbortReq(rid))
        return True

    # ---- control --------------------------------------------------------------------------
    async def flush_cache(self) -> bool:
        return (await self._ask(FlushCacheReq(), FlushCacheResult)).success

    async def get_server_info(self) -> ServerInfo:
        return await self._ask(GetServerInfoReq(), ServerInfo)

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
        while True:
            message = codec.decode(await self._from_scheduler.recv())
            if isinstance(message, BatchOutput):
                for out in message.outputs:
                    state = self._states.get(out.rid)
                    if state is not None:
                        state.queue.put_nowait(out)
            elif isinstance(message, RequestError):
                state = self._states.get(message.rid)
                if state is not None:
                    state.queue.put_nowait(message)
            else:
                future = self._control.pop(type(message), None)
                if future is not None and not future.done():
                    future.set_result(message)

    def scheduler_died(self) -> None:
        """Fails every request in flight; called by the server's watchdog."""
        self.alive = False
        for state in self._states.values():
            state.queue.put_nowait(SchedulerDiedError("the scheduler process has exited"))
        for future in self._control.values():
            if not future.done():
                future.set_exception(SchedulerDiedError("the scheduler process has exited"))
