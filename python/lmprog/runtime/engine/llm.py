"""The offline engine: `LLM(model=...).generate(prompts, SamplingParams(...))`.

It steps the very same Scheduler the server runs, in-process, until every request it submitted
has finished.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from typing import Any

from lmprog.runtime.engine.engine_args import server_args_from
from lmprog.runtime.engine.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    RequestMetrics,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from lmprog.runtime.engine.prompts import PromptType, tokenize_prompt
from lmprog.runtime.managers.io_struct import TokenizedGenerateReqInput
from lmprog.runtime.managers.schedule_batch import Req
from lmprog.runtime.managers.scheduler import Scheduler
from lmprog.runtime.managers.validation import truncate_prompt
from lmprog.runtime.sampling.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from lmprog.runtime.sampling.sampling_params import SamplingParams
from lmprog.runtime.server_args import DEFAULT_MODEL

Conversation = list[dict[str, Any]]


class LLM:
    """An offline engine over one model. Keywords are the server's flags (ServerArgs fields);
    `model`, `tokenizer` and `tensor_parallel_size` are accepted under vLLM's names."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        tokenizer: str | None = None,
        tensor_parallel_size: int = 1,
        runner: str | None = None,
        task: str | None = None,
        **engine_args: Any,
    ) -> None:
        """`runner="pooling"` (vLLM) or `task="embed"` (older vLLM) serve the model as an
        embedder, like `is_embedding=True`; encoder models (BERT) are embedders anyway."""
        self.server_args = server_args_from(
            model,
            tokenizer=tokenizer,
            tensor_parallel_size=tensor_parallel_size,
            runner=runner,
            task=task,
            **engine_args,
        )
        self.scheduler = Scheduler(self.server_args)
        self.tokenizer = self.scheduler.tokenizer
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    # ---- public API -----------------------------------------------------------------------
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates for every prompt; results come back in input order."""
        self._require_generation("generate")
        inputs = [self._tokenize(p) for p in _as_prompt_list(prompts)]
        return self._run(inputs, sampling_params, use_tqdm)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt, in input order. `truncate_prompt_tokens` keeps only the
        last N tokens of longer prompts (else they are refused past the model's limit)."""
        self._require_embedding("embed")
        inputs = [self._tokenize(p) for p in _as_prompt_list(prompts)]
        if truncate_prompt_tokens is not None:
            inputs = [(t, truncate_prompt(ids, truncate_prompt_tokens)) for t, ids in inputs]
        outs = self._run_to_end(inputs, None, use_tqdm)
        return [
            EmbeddingRequestOutput(
                rid, EmbeddingOutput(seqs[0].embedding), seqs[0].origin_input_ids
            )
            for rid, seqs in outs
        ]

    def score(
        self,
        data_1: PromptType | Sequence[PromptType],
        data_2: PromptType | Sequence[PromptType],
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[ScoringRequestOutput]:
        """Cosine similarity of each pair's embeddings: one text against many (`data_1` a
        single prompt), or pairwise (two lists of the same length)."""
        self._require_embedding("score")
        first, second = _as_prompt_list(data_1), _as_prompt_list(data_2)
        if len(first) == 1:
            first = first * len(second)
        if len(first) != len(second) or not second:
            raise ValueError(
                f"score pairs texts: data_1 has {len(first)} and data_2 {len(second)}; give one "
                "text and a list, or two lists of the same non-zero length"
            )
        vectors = self.embed(first + second, truncate_prompt_tokens, use_tqdm)
        a, b = vectors[: len(first)], vectors[len(first) :]
        return [
            ScoringRequestOutput(
                y.request_id,
                ScoringOutput(_cosine(x.outputs.embedding, y.outputs.embedding)),
                y.prompt_token_ids,
            )
            for x, y in zip(a, b)
        ]

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generates replies to one conversation or a list of them through the chat template."""
        self._require_generation("chat")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        inputs = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(
                conv,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
                **(chat_template_kwargs or {}),
            )
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            inputs.append((text, ids))
        return self._run(inputs, sampling_params, use_tqdm)

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """The `params.beam_width` best continuations of each prompt, best first (vLLM's
        `LLM.beam_search`; sampling/beam_search.py says how). Every step runs one token for
        every live beam of every prompt in one batch; beams share their history's KV through
        the prefix cache."""
        self._require_generation("beam_search")
        inputs = [self._tokenize(p) for p in _as_prompt_list(prompts)]
        for i, (_, ids) in enumerate(inputs):  # the longest beams must fit the context too
            try:
                self.scheduler.validate(ids, SamplingParams(max_tokens=params.max_tokens))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}" if len(inputs) > 1 else str(e)) from None
        searches = [BeamSearch(ids, params, self.scheduler.eos_token_ids) for _, ids in inputs]
        width = searches[0].candidates_per_beam if searches else 0
        if width > self.server_args.max_logprobs:
            raise ValueError(
                f"beam_width {params.beam_width} needs the top {width} logprobs per step, more "
                f"than max_logprobs ({self.server_args.max_logprobs}): raise max_logprobs"
            )
        step = SamplingParams(max_tokens=1, temperature=0, logprobs=width, ignore_eos=True)
        bar = _progress(params.max_tokens) if use_tqdm else None
        while live := [s for s in searches if not s.done]:
            beams = [(None, ids) for s in live for ids in s.prompts()]
            outs = iter(self._run_to_end(beams, step, use_tqdm=False))
            for search in live:
                tops = [next(outs)[1][0].logprobs[0][1] for _ in search.running]
                search.advance(tops)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return [s.result(self.tokenizer.decode) for s in searches]

    def get_kv_stats(self) -> dict[str, int]:
        """KV accounting (total, free, evictable, protected slots; running/waiting requests)."""
        return self.scheduler.kv_stats()

    def get_cache_stats(self) -> dict[str, float]:
        """Prefix-cache counters since start: prompt tokens queried, found cached, hit rate."""
        st = self.scheduler.stats
        return {
            "query_tokens": st.cache_query_tokens,
            "hit_tokens": st.cache_hit_tokens,
            "hit_rate": st.cache_hit_rate,
        }

    def reset_prefix_cache(self) -> bool:
        """Drops every cached prefix (all KV slots free again); False while requests run."""
        return self.scheduler.flush_cache()

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    # ---- internals ------------------------------------------------------------------------
    @property
    def is_embedding(self) -> bool:
        return self.scheduler.is_embedding

    def _require_generation(self, method: str) -> None:
        if self.is_embedding:
            raise ValueError(
                f"{self.server_args.model_path} is loaded as an embedding model: {method}() "
                "needs a generation model; use embed() or score()"
            )

    def _require_embedding(self, method: str) -> None:
        if not self.is_embedding:
            raise ValueError(
                f"{self.server_args.model_path} is loaded as a generation model: {method}() "
                "needs an embedding model (an encoder such as all-minilm-l6-v2, or "
                "LLM(..., runner='pooling'))"
            )

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        return tokenize_prompt(self.tokenizer, prompt)

    def _run(
        self,
        inputs: list[tuple[str | None, list[int]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        """Runs every input to the end; RequestOutputs in input order."""
        finished = self._run_to_end(inputs, sampling_params, use_tqdm)
        return [_request_output(rid, seqs, self.tokenizer) for rid, seqs in finished]

    def _run_to_end(
        self,
        inputs: list[tuple[str | None, list[int]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool,
    ) -> list[tuple[str, list[Req]]]:
        """Validates every input, then runs them all; (rid, finished sequences) in input order."""
        params = _per_prompt_params(sampling_params, len(inputs))
        # Validate everything before enqueueing anything: a bad prompt leaves the engine idle.
        for i, ((_, ids), p) in enumerate(zip(inputs, params)):
            try:
                self.scheduler.validate(ids, p)
                self.scheduler.check_grammar(p)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}" if len(inputs) > 1 else str(e)) from None
        rids = [f"offline-{next(self._ids)}" for _ in inputs]
        now = time.time()
        for rid, (text, ids), p in zip(rids, inputs, params):
            self.scheduler.add_request(TokenizedGenerateReqInput(rid, ids, p, text, now))
        try:
            finished = self._drive(set(rids), use_tqdm)
        except BaseException:
            for rid in rids:
                self.scheduler.abort_request(rid)
            while self.scheduler.has_work():
                self.scheduler.step()
            raise
        return [(rid, finished[rid]) for rid in rids]

    def _drive(self, rids: set[str], use_tqdm: bool) -> dict[str, list[Req]]:
        """Steps the scheduler until every sequence of `rids` finished; groups them by rid."""
        expected = {}
        finished: dict[str, list[Req]] = {rid: [] for rid in rids}
        for req in self.scheduler.waiting:
            if req.rid in rids:
                expected[req.rid] = req.sampling_params.n
        bar = _progress(len(rids)) if use_tqdm else None
        start, n_out, done = time.perf_counter(), 0, 0
        while done < len(rids):
            for req in self.scheduler.step():
                if req.rid not in rids:
                    continue
                n_out += 1
                if req.finished:
                    finished[req.rid].append(req)
                    # One that ended before forking (failed in its prefill) ends all n.
                    expected[req.rid] -= req.family
                    if expected[req.rid] == 0:
                        done += 1
                        if bar is not None:
                            bar.update(1)
            if bar is not None:
                bar.set_postfix_str(
                    f"output {n_out / (time.perf_counter() - start):.1f} tok/s", refresh=False
                )
        if bar is not None:
            bar.close()
        return finished


def _cosine(x: list[float], y: list[float]) -> float:
    dot = sum(a * b for a, b in zip(x, y))
    norm = math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y))
    return dot / norm if norm else 0.0


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _per_prompt_params(
    sampling_params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * n
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    params = list(sampling_params)
    if len(params) != n:
        raise ValueError(
            f"sampling_params has {len(params)} entries; it must be one, or one per prompt ({n})"
        )
    return params


def _progress(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)


def logprob_dict(
    token: int, chosen: float, top: dict[int, float], tokenizer: Any
) -> dict[int, Logprob]:
    """vLLM's per-position entry: the top-k by rank, plus the scored token if not among them."""
    entry = {
        tid: Logprob(lp, rank, tokenizer.decode([tid]))
        for rank, (tid, lp) in enumerate(top.items(), start=1)
    }
    if token not in entry:
        entry[token] = Logprob(chosen, None, tokenizer.decode([token]))
    return entry


def _completion(req: Req, tokenizer: Any) -> CompletionOutput:
    logprobs = None
    if req.logprobs is not None:
        logprobs = [
            logprob_dict(token, chosen, top, tokenizer)
            for token, (chosen, top) in zip(req.output_ids, req.logprobs)
        ]
    reason = req.finished_reason
    return CompletionOutput(
        index=req.index,
        text=req.output_text.text,
        token_ids=list(req.output_ids),
        cumulative_logprob=req.cumulative_logprob,
        logprobs=logprobs,
        finish_reason=reason.kind if reason else None,
        stop_reason=reason.matched if reason else None,
    )


def _prompt_logprobs(req: Req, tokenizer: Any) -> list[dict[int, Logprob] | None] | None:
    """vLLM's prompt_logprobs: None for the first prompt token, then one entry per token."""
    if req.input_logprob_start is None:
        return None
    tokens = req.origin_input_ids[req.input_logprob_start :]
    return [
        None if chosen is None else logprob_dict(token, chosen, top, tokenizer)
        for token, (chosen, top) in zip(tokens, req.input_logprobs)
    ]


def _request_output(rid: str, seqs: list[Req], tokenizer: Any) -> RequestOutput:
    seqs = sorted(seqs, key=lambda r: r.index)
    first = seqs[0]
    t = first.times
    metrics = RequestMetrics(
        arrival_time=t.arrival,
        first_scheduled_time=t.first_scheduled,
        first_token_time=min(
            (s.times.first_token for s in seqs if s.times.first_token), default=None
        ),
        last_token_time=max((s.times.last_token for s in seqs if s.times.last_token), default=None),
        finished_time=max(s.times.finished for s in seqs if s.times.finished),
    )
    errors = [
        s.finished_reason.message for s in seqs if s.finished_reason and s.finished_reason.message
    ]
    return RequestOutput(
        request_id=rid,
        prompt=first.input_text,
        prompt_token_ids=list(first.origin_input_ids),
        outputs=[_completion(s, tokenizer) for s in seqs],
        finished=True,
        num_cached_tokens=first.num_cached_tokens,
        metrics=metrics,
        prompt_logprobs=_prompt_logprobs(first, tokenizer),
        error=errors[0] if errors else None,
    )
