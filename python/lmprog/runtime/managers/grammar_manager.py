"""The scheduler's side of constrained decoding: compile on arrival, admit when compiled,
append what the grammar forces.

    arrival    attach(req): its grammar is submitted to the compile thread
    waiting    poll(waiting): a compiled grammar becomes the request's matcher; one that does
               not compile fails the request ('error': the API answers 400)
    admission  the scheduler skips requests whose grammar is still compiling
    decoding   jump_forward(req): after a sampled token, the tokens the grammar forces
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, wait
from typing import Any

from lmprog.runtime.managers.io_struct import FinishReason
from lmprog.runtime.managers.schedule_batch import Req
from lmprog.runtime.sampling.constrained.grammar_backend import GrammarBackend, GrammarError
from lmprog.runtime.sampling.constrained.grammar_spec import spec_of
from lmprog.runtime.sampling.constrained.matcher import Matcher

IDLE_WAIT_S = 0.05  # how long an idle step waits for a compile before returning


class GrammarManager:
    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        cache_size: int = 256,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.cache_size = cache_size
        self._backend: GrammarBackend | None = None  # built on first use (~0.5 s)

    @property
    def backend(self) -> GrammarBackend:
        if self._backend is None:
            self._backend = GrammarBackend(
                self.tokenizer, self.vocab_size, self.stop_token_ids, self.cache_size
            )
        return self._backend

    def check(self, params: Any) -> None:
        """Compiles a grammar now (cached for when it runs); raises ValueError if it does not."""
        if params.is_constrained:
            self.backend.compile(spec_of(params))

    def attach(self, req: Req, jump_forward: bool) -> None:
        params = req.sampling_params
        if not params.is_constrained:
            return
        req.grammar_future = self.backend.submit(spec_of(params))
        # Forced tokens are not sampled, so they have no logprobs to report.
        req.jump_forward = jump_forward and params.logprobs is None

    def poll(self, waiting: Iterable[Req]) -> None:
        if self._backend is None:
            return
        for req in waiting:
            future = req.grammar_future
            if future is None or not future.done():
                continue
            req.grammar_future = None
            try:
                req.matcher = Matcher(future.result(), self.tokenizer)
            except GrammarError as e:
                req.finish(FinishReason("error", message=str(e)))

    def wait_for_one(self, waiting: Iterable[Req]) -> None:
        """Blocks briefly until some waiting request's grammar compiles (instead of spinning
        when nothing else can run)."""
        pending = [r.grammar_future for r in waiting if r.grammar_future is not None]
        if pending:
            wait(pending, timeout=IDLE_WAIT_S, return_when=FIRST_COMPLETED)

    @staticmethod
    def jump_forward(req: Req, context_len: int) -> int:
        """Appends the tokens the grammar forces after req's new token; returns how many. The
        next step computes their KV together (an extend)."""
        forced = req.matcher.forced_tokens()
        for token in forced:
            req.append_token(token, context_len, forced=True)
            if req.finished:
                break
        return len(forced)
