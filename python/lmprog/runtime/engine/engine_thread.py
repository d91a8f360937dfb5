"""The streaming engine's background thread: the Scheduler, stepped while there is work.

    event loops --submit(command)--> inbox --> engine thread: run the commands waiting, step,
                <------------- on_reports(this step's SeqOutputs / RequestErrors)

Once the thread runs, only it touches the Scheduler: everything else reaches it through
`submit` (a command, run with the scheduler between two steps) or `call` (the same, with a
Future of the result). torch releases the GIL inside its kernels, so event loops stay responsive
while a step runs. Idle, the thread blocks on its inbox.

`stop()` aborts every request in flight, steps until they are all reported and their KV freed,
then ends the thread and drops the scheduler (the model and KV pool go with it). Commands that
arrive later are refused with EngineDeadError; `call`s left waiting fail with it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from lmprog.runtime.engine.exceptions import EngineDeadError
from lmprog.runtime.managers.io_struct import RequestError, SeqOutput
from lmprog.runtime.managers.scheduler import Scheduler
from lmprog.runtime.managers.seq_report import report

logger = logging.getLogger(__name__)
T = TypeVar("T")
Command = Callable[[Scheduler], Any]
Reports = list[SeqOutput | RequestError]
_STOP = None  # the inbox item that ends the thread


class EngineThread:
    def __init__(
        self,
        scheduler: Scheduler,
        on_reports: Callable[[Reports], None],
        on_exit: Callable[[BaseException | None], None],
    ) -> None:
        """`on_reports` and `on_exit` (with the error that ended the thread, if any) are called
        on the engine thread."""
        self._scheduler: Scheduler | None = scheduler
        self._on_reports = on_reports
        self._on_exit = on_exit
        self._inbox: queue.SimpleQueue[tuple[Command, Future | None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders submits against the thread's exit
        self._exited = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lmprog-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return not self._exited

    def submit(self, command: Command, future: Future | None = None) -> None:
        """Runs `command(scheduler)` on the engine thread before its next step. Raises
        EngineDeadError once the thread has stopped."""
        with self._lock:
            if self._exited:
                raise EngineDeadError(self._dead_message())
            self._inbox.put((command, future))

    def call(self, fn: Callable[[Scheduler], T]) -> Future[T]:
        """`fn(scheduler)` on the engine thread; its result (or exception) in the Future."""
        future: Future[T] = Future()
        self.submit(fn, future)
        return future

    def stop(self) -> None:
        """Aborts what is in flight, ends the thread and releases the scheduler. Idempotent."""
        with self._lock:
            if not self._exited:
                self._inbox.put(_STOP)
        self._thread.join()
        if self._scheduler is not None:
            self._scheduler.model_runner.shutdown()  # other tensor-parallel ranks, if any
        self._scheduler = None

    # ---- the thread -----------------------------------------------------------------------
    def _run(self) -> None:
        sched = self._scheduler
        assert sched is not None, "the engine thread started without a scheduler"
        try:
            while self._run_commands(sched):
                if sched.has_work():
                    self._on_reports(self._step(sched))
            self._abort_all(sched)
        except BaseException as e:  # reported to every request still waiting, via on_exit
            logger.exception("the engine thread died")
            self.error = e
        finally:
            self._exit()

    def _run_commands(self, sched: Scheduler) -> bool:
        """Runs every command waiting (blocking for the first while idle); False on stop."""
        block = not sched.has_work()
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if item is _STOP:
                return False
            command, future = item
            _run_command(command, future, sched)
            block = False

    @staticmethod
    def _step(sched: Scheduler) -> Reports:
        """One scheduler step and its reports. The scheduler contains faults of a batch or of
        one sequence; anything that escapes it fails every request in flight (reported, with
        its KV freed) rather than ending the engine, as the server's scheduler loop does."""
        try:
            reqs = sched.step()
        except Exception as e:  # reported to every request in flight
            logger.exception("a scheduler step failed; failing every request in flight")
            reqs = sched.fail_all(e)
        return [out for req in reqs for out in report(req)]

    def _abort_all(self, sched: Scheduler) -> None:
        """Stopping: every request in flight ends with finish_reason 'abort'."""
        for rid in {r.rid for r in [*sched.waiting, *sched.active_requests()]}:
            sched.abort_request(rid)
        while sched.has_work():
            self._on_reports(self._step(sched))

    def _exit(self) -> None:
        with self._lock:
            self._exited = True
        while True:  # what arrived after the stop will never run
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            future = item[1] if item is not _STOP else None
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(EngineDeadError(self._dead_message()))
        self._on_exit(self.error)

    def _dead_message(self) -> str:
        if self.error is None:
            return "the engine has been shut down"
        return f"the engine thread died: {type(self.error).__name__}: {self.error}"


def _run_command(command: Command, future: Future | None, sched: Scheduler) -> None:
    """Runs one command; its failure goes to its Future, or to the log, never further."""
    if future is not None and not future.set_running_or_notify_cancel():
        return
    try:
        result = command(sched)
    except Exception as e:  # the caller's (or the log's), not the engine's
        if future is None:
            logger.exception("an engine command failed")
        else:
            future.set_exception(e)
        return
    if future is not None:
        future.set_result(result)
