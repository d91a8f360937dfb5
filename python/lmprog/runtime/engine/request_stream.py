"""One request's outputs, as its `AsyncLLM.generate` generator reads them.

The engine thread hands each step's reports of the request (new token ids and text per
sequence, or its failure) to the request's event loop, which `add`s them here; the generator
awaits `next_output`, which builds a RequestOutput the way the request's output_kind says:

    CUMULATIVE  every sequence, everything so far            (one output per step with news)
    DELTA       the sequences with news, only what is new    (one output per step with news)
    FINAL_ONLY  every sequence, everything                   (one output, at the end)

A reader that falls behind gets the news of several steps merged into one output (the latest
state, or every delta since its previous output), so no token is lost or repeated. The last
output has `finished=True` and each sequence's finish_reason.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from lmprog.runtime.engine.build_outputs import logprob_dict
from lmprog.runtime.engine.exceptions import EngineGenerateError
from lmprog.runtime.engine.outputs import CompletionOutput, Logprob, RequestOutput
from lmprog.runtime.managers.io_struct import FinishReason, RequestError, SeqOutput
from lmprog.runtime.sampling.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class _Sequence:
    """One of the request's n sequences, as far as the engine reported it."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish: FinishReason | None = None
    changed: bool = False  # has news since the previous output
    sent_tokens: int = 0  # tokens and characters earlier outputs carried
    sent_chars: int = 0

    def take(self, delta: bool) -> CompletionOutput:
        """Everything so far, or (delta) what earlier outputs did not carry."""
        tokens, chars = (self.sent_tokens, self.sent_chars) if delta else (0, 0)
        self.sent_tokens, self.sent_chars = len(self.token_ids), len(self.text)
        self.changed = False
        return CompletionOutput(
            index=self.index,
            text=self.text[chars:],
            token_ids=self.token_ids[tokens:],
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs[tokens:] if self.logprobs is not None else None,
            finish_reason=self.finish.kind if self.finish else None,
            stop_reason=self.finish.matched if self.finish else None,
        )


class RequestStream:
    """A request's outputs: `add` is called on its event loop (by the engine thread's routing),
    `next_output` by its generator on the same loop."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer: Any,
    ) -> None:
        self.request_id = request_id
        self._prompt = prompt
        self._prompt_ids = prompt_token_ids
        self._kind = params.output_kind
        self._tokenizer = tokenizer
        self._seqs = [_Sequence(i) for i in range(params.n)]
        self._prompt_logprobs: list[dict[int, Logprob] | None] | None = None
        self._num_cached_tokens = 0
        self._error: BaseException | None = None
        self._done = False  # the final output was returned, or the error raised
        self._news = asyncio.Event()

    @property
    def finished(self) -> bool:
        return all(s.finish is not None for s in self._seqs)

    def add(self, reports: list[SeqOutput | RequestError | BaseException]) -> None:
        """Takes in a step's reports of this request (an exception ends it with that error)."""
        for item in reports:
            if isinstance(item, SeqOutput):
                self._add_seq(item)
            elif isinstance(item, RequestError):
                # 400: refused by the scheduler (a grammar that does not compile, a request
                # that can never fit); 500: an engine fault while it ran.
                kind = ValueError if item.status == 400 else EngineGenerateError
                self._error = kind(item.message)
            else:
                self._error = item
        self._news.set()

    async def next_output(self) -> RequestOutput | None:
        """The next output to yield; None after the final one. Raises the request's error."""
        while not self._done:
            if self._error is not None:
                self._done = True
                raise self._error
            output = self._take()
            if output is not None:
                return output
            self._news.clear()
            await self._news.wait()
        return None

    def _add_seq(self, out: SeqOutput) -> None:
        seq = self._seqs[out.index]
        seq.token_ids += out.token_ids
        seq.text += out.text
        if out.logprobs is not None:
            seq.logprobs = (seq.logprobs or []) + [
                logprob_dict(token, chosen, top, self._tokenizer)
                for token, (chosen, top) in zip(out.token_ids, out.logprobs)
            ]
            seq.cumulative_logprob = (seq.cumulative_logprob or 0.0) + sum(
                chosen for chosen, _ in out.logprobs
            )
        if out.input_logprobs is not None and self._prompt_logprobs is None:
            # The prompt is scored from its first token (logprob_start_len 0).
            self._prompt_logprobs = [
                None if chosen is None else logprob_dict(token, chosen, top, self._tokenizer)
                for token, (chosen, top) in zip(self._prompt_ids, out.input_logprobs)
            ]
        seq.finish = out.finish_reason or seq.finish
        seq.changed = True
        self._num_cached_tokens = out.cached_tokens

    def _take(self) -> RequestOutput | None:
        """An output if the output kind has one to give now (marking its news as sent)."""
        finished = self.finished
        if self._kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        if not any(s.changed for s in self._seqs):
            return None
        delta = self._kind is RequestOutputKind.DELTA
        # DELTA: prompt logprobs go out once, with the first output.
        first = all(s.sent_tokens == 0 and s.sent_chars == 0 for s in self._seqs)
        seqs = [s for s in self._seqs if s.changed] if delta else self._seqs
        completions = [s.take(delta) for s in seqs]
        self._done = finished
        return RequestOutput(
            request_id=self.request_id,
            prompt=self._prompt,
            prompt_token_ids=self._prompt_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=self._num_cached_tokens,
            prompt_logprobs=self._prompt_logprobs if first or not delta else None,
        )
