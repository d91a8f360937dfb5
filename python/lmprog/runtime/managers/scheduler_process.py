"""The scheduler's process in the server: the Scheduler loop behind two ZMQ sockets.

    API process  --TokenizedGenerateReqInput / AbortReq / FlushCacheReq / GetServerInfoReq-->
    scheduler    --BatchOutput / RequestError / FlushCacheResult / ServerInfo------------------>

While requests run, it drains its inbox without blocking between steps; when idle it waits on
the inbox. Every step reports the sequences that gained tokens (streaming requests) or ended;
its counters go out when asked (GetServerInfoReq: /get_server_info and /metrics).

Under tensor parallelism this process is rank 0 and the parent of its machine's other ranks.
Losing a rank ends it (and so the server) with the reason logged: a watcher sees a local rank
exit, and a step that fails, which is how a remote rank's loss shows, cannot be retried
because the ranks no longer run in step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import zmq

from lmprog.runtime.distributed.parallel_state import TpOutOfStepError
from lmprog.runtime.layers.kernels import cpu_path
from lmprog.runtime.managers import codec
from lmprog.runtime.managers.io_struct import (
    AbortReq,
    BatchOutput,
    FlushCacheReq,
    FlushCacheResult,
    GetServerInfoReq,
    RequestError,
    SchedulerReady,
    ServerInfo,
    TokenizedGenerateReqInput,
    internal_error,
)
from lmprog.runtime.managers.schedule_batch import Req
from lmprog.runtime.managers.scheduler import Scheduler
from lmprog.runtime.managers.seq_report import report
from lmprog.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)
IDLE_POLL_MS = 1000  # also how soon an orphaned scheduler notices its parent is gone
RANK_POLL_S = 0.5  # how soon a lost tensor-parallel rank ends the server


def run_scheduler_process(
    server_args: ServerArgs, inbox_addr: str, outbox_addr: str, ready: Connection
) -> None:
    """Process entry: loads the model, says ready (or why not), then serves until killed."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s scheduler %(message)s")
    try:
        scheduler = Scheduler(server_args)
    except Exception as e:  # noqa: BLE001 -- the API process prints it and exits
        ready.send(f"{type(e).__name__}: {e}")
        raise SystemExit(1) from None
    mr = scheduler.model_runner
    if mr.workers:
        threading.Thread(target=_watch_ranks, args=(mr,), daemon=True).start()
    ctx = zmq.Context()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inbox.connect(inbox_addr)
    outbox.connect(outbox_addr)
    ready.send(
        SchedulerReady(
            model_path=server_args.model_path,
            context_len=mr.context_len,
            vocab_size=mr.vocab_size,
            max_total_tokens=mr.max_total_tokens,
            device=str(mr.device),
            dtype=str(mr.dtype).removeprefix("torch."),
            is_embedding=mr.is_embedding,
            embedding_dim=_embedding_dim(mr),
            pooling_task=mr.pooling_task,
            attention_backend=mr.attention_backend,
            cpu_path=cpu_path(),
            eos_token_ids=tuple(sorted(scheduler.eos_token_ids)),
        )
    )
    SchedulerLoop(scheduler, inbox, outbox).run()
    mr.shutdown()


def _watch_ranks(mr: Any) -> None:
    """Ends this process when one of its tensor-parallel ranks exits."""
    while (why := mr.dead_worker()) is None:
        time.sleep(RANK_POLL_S)
    logger.error("%s; the server cannot run without it: exiting", why)
    os._exit(1)


class SchedulerLoop:
    def __init__(self, scheduler: Scheduler, inbox: zmq.Socket, outbox: zmq.Socket) -> None:
        self.scheduler = scheduler
        self.inbox = inbox
        self.outbox = outbox
        self.parent = os.getppid()

    def run(self) -> None:
        while True:
            for message in self._receive(block=not self.scheduler.has_work()):
                self._handle(message)
            if self.scheduler.has_work():
                self._report_all(self._step())
            elif os.getppid() != self.parent:
                logger.info("the API process is gone; exiting")
                return

    def _step(self) -> list[Req]:
        """One scheduler step. The scheduler contains faults of a batch or of one sequence
        itself; anything that escapes it fails every request in flight (reported, with its KV
        freed) rather than ending the server."""
        try:
            return self.scheduler.step()
        except Exception as e:  # reported to every request in flight
            logger.exception("a scheduler step failed; failing every request in flight")
            failed = self.scheduler.fail_all(e)
            if isinstance(e, TpOutOfStepError):
                self._report_all(failed)
                logger.error("%s; the server cannot go on: exiting", e)
                self._exit(1)
            return failed

    def _exit(self, code: int) -> None:
        """Exits at once, after the reports already sent have left (ZMQ sends in the
        background; a plain exit could drop them)."""
        self.inbox.close(linger=0)
        self.outbox.close(linger=2000)
        self.outbox.context.term()
        os._exit(code)

    def _report_all(self, reqs: list[Req]) -> None:
        reports = [out for r in reqs if r.stream or r.finished for out in report(r)]
        outputs = [r for r in reports if not isinstance(r, RequestError)]
        for error in reports:
            if isinstance(error, RequestError):
                self._send(error)
        if outputs:
            self._send(BatchOutput(outputs))

    def _receive(self, block: bool) -> list[Any]:
        messages = []
        if block and not self.inbox.poll(IDLE_POLL_MS):
            return messages
        while True:
            try:
                messages.append(codec.decode(self.inbox.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return messages

    def _handle(self, message: Any) -> None:
        sched = self.scheduler
        if isinstance(message, TokenizedGenerateReqInput):
            try:
                sched.add_request(message)
            except ValueError as e:
                self._send(RequestError(message.rid, str(e)))
            except Exception as e:  # this request fails, the server goes on
                logger.exception("request %s could not be added", message.rid)
                self._send(RequestError(message.rid, internal_error(e).message, 500))
        elif isinstance(message, AbortReq):
            sched.abort_request(message.rid)
        elif isinstance(message, FlushCacheReq):
            self._send(FlushCacheResult(sched.flush_cache()))
        elif isinstance(message, GetServerInfoReq):
            self._send(self._server_info(message.cache_tree))
        else:
            logger.error("ignoring an unknown message %s", type(message).__name__)

    def _server_info(self, with_tree: bool) -> ServerInfo:
        stats = self.scheduler.stats
        counters = dataclasses.asdict(stats) | {"cache_hit_rate": stats.cache_hit_rate}
        tree = self.scheduler.cache_tree() if with_tree else None
        return ServerInfo(kv=self.scheduler.kv_stats(), stats=counters, cache_tree=tree)

    def _send(self, message: Any) -> None:
        self.outbox.send(codec.encode(message))


def _embedding_dim(mr: Any) -> int | None:
    task = mr.pooling_task
    return int(mr.config.hidden_size) if task is not None and task.kind == "embed" else None
