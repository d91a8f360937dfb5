"""The offline engine: `LLM(model=...).generate(prompts, SamplingParams(...))`.

It steps the very same Scheduler the server runs, in-process, until every request it submitted
has finished.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import torch

from lmprog.runtime.engine.build_outputs import request_output
from lmprog.runtime.engine.engine_args import server_args_from, task_call
from lmprog.runtime.engine.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from lmprog.runtime.engine.prompts import PromptType, tokenize_prompt
from lmprog.runtime.managers.io_struct import TokenizedGenerateReqInput
from lmprog.runtime.managers.pair_inputs import encode_pair, pair_up
from lmprog.runtime.managers.schedule_batch import Req
from lmprog.runtime.managers.scheduler import Scheduler
from lmprog.runtime.managers.validation import truncate_prompt
from lmprog.runtime.models.pooling_task import (
    PoolingTask,
    class_probs,
    cosine,
    pair_score,
    refusal,
    serves,
)
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
        """`runner="pooling"` (vLLM; or `is_embedding=True`) serves the model as a pooling
        model, whose architecture decides what it computes (models/pooling_task.py): a
        classifier classifies, a token classifier scores tokens, any other model embeds.
        Classifiers and encoders (BERT) pool anyway. Older vLLM's `task` ("embed",
        "classify", "score", "reward") asks for pooling too, and checks the model serves it."""
        call = task_call(task)
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
        if call is not None:
            self._require(call)

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def shutdown(self) -> None:
        """Stops the other tensor-parallel ranks this engine started and leaves their group, so
        the process may build another sharded engine (with one rank: nothing to do). The
        engine cannot run afterwards. Idempotent."""
        self.scheduler.model_runner.shutdown()

    # ---- public API -----------------------------------------------------------------------
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates for every prompt; results come back in input order."""
        self._require("generate")
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
        self._require("embed")
        return [
            EmbeddingRequestOutput(rid, EmbeddingOutput(out), ids)
            for rid, ids, out in self._pool(prompts, truncate_prompt_tokens, use_tqdm)
        ]

    def classify(
        self,
        prompts: PromptType | Sequence[PromptType],
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[ClassificationRequestOutput]:
        """A sequence classifier's class probabilities per prompt (softmax over the labels,
        whose names are `config.id2label`), in input order."""
        self._require("classify")
        return [
            ClassificationRequestOutput(rid, ClassificationOutput(class_probs(out)), ids)
            for rid, ids, out in self._pool(prompts, truncate_prompt_tokens, use_tqdm)
        ]

    def reward(
        self,
        prompts: PromptType | Sequence[PromptType],
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[PoolingRequestOutput]:
        """A reward model's raw outputs per prompt: `outputs.data` is [num_labels] for a
        sequence classifier (one label: the reward), [tokens, num_labels] for a token
        classifier (a score per prompt token)."""
        self._require("reward")
        return [
            PoolingRequestOutput(rid, PoolingOutput(torch.tensor(out)), ids)
            for rid, ids, out in self._pool(prompts, truncate_prompt_tokens, use_tqdm)
        ]

    def score(
        self,
        data_1: PromptType | Sequence[PromptType],
        data_2: PromptType | Sequence[PromptType],
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[ScoringRequestOutput]:
        """One score per pair: one text against many (`data_1` a single prompt), or pairwise
        (two lists of the same length). An embedder gives the cosine similarity of the two
        embeddings; a cross-encoder (a classifier with one label) reads the pair as one input
        and gives the sigmoid of its logit."""
        self._require("score")
        first, second = pair_up(_as_prompt_list(data_1), _as_prompt_list(data_2))
        if self.scheduler.model_runner.pooling_task.kind == "embed":
            vectors = self.embed(first + second, truncate_prompt_tokens, use_tqdm)
            a, b = vectors[: len(first)], vectors[len(first) :]
            return [
                ScoringRequestOutput(
                    y.request_id,
                    ScoringOutput(cosine(x.outputs.embedding, y.outputs.embedding)),
                    y.prompt_token_ids,
                )
                for x, y in zip(a, b)
            ]
        pairs = [
            encode_pair(self.tokenizer, _text(x), _text(y), truncate_prompt_tokens)
            for x, y in zip(first, second)
        ]
        inputs = [(None, ids) for ids, _ in pairs]
        finished = self._run_to_end(inputs, None, use_tqdm, [types for _, types in pairs])
        return [
            ScoringRequestOutput(rid, ScoringOutput(pair_score(out)), ids)
            for (rid, out), (_, ids) in zip(_pooled(finished), inputs)
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
        self._require("generate")
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
        self._require("generate")
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
        """A pooling model (`pooling_task` says which kind), not a generation one."""
        return self.scheduler.is_embedding

    @property
    def pooling_task(self) -> PoolingTask | None:
        return self.scheduler.model_runner.pooling_task

    def _require(self, call: str) -> None:
        """ValueError unless the loaded model answers `call` (generate, embed, classify,
        score, reward), saying what it answers instead."""
        if not serves(self.pooling_task, call):
            raise ValueError(refusal(self.pooling_task, call, self.server_args.model_path))

    def _pool(
        self,
        prompts: PromptType | Sequence[PromptType],
        truncate_prompt_tokens: int | None,
        use_tqdm: bool,
    ) -> list[tuple[str, list[int], list]]:
        """(rid, prompt token ids, the model's output) per prompt, in input order."""
        inputs = [self._tokenize(p) for p in _as_prompt_list(prompts)]
        if truncate_prompt_tokens is not None:
            inputs = [(t, truncate_prompt(ids, truncate_prompt_tokens)) for t, ids in inputs]
        finished = self._run_to_end(inputs, None, use_tqdm)
        return [(rid, ids, out) for (rid, out), (_, ids) in zip(_pooled(finished), inputs)]

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
        return [request_output(rid, seqs, self.tokenizer) for rid, seqs in finished]

    def _run_to_end(
        self,
        inputs: list[tuple[str | None, list[int]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool,
        token_types: list[list[int] | None] | None = None,
    ) -> list[tuple[str, list[Req]]]:
        """Validates every input, then runs them all; (rid, finished sequences) in input order.
        `token_types`: per input, a cross-encoder pair's segment ids (or None)."""
        params = _per_prompt_params(sampling_params, len(inputs))
        token_types = token_types or [None] * len(inputs)
        # Validate everything before enqueueing anything: a bad prompt leaves the engine idle.
        for i, ((_, ids), p) in enumerate(zip(inputs, params)):
            try:
                self.scheduler.validate(ids, p)
                self.scheduler.check_grammar(p)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}" if len(inputs) > 1 else str(e)) from None
        rids = [f"offline-{next(self._ids)}" for _ in inputs]
        now = time.time()
        for rid, (text, ids), p, types in zip(rids, inputs, params, token_types):
            self.scheduler.add_request(
                TokenizedGenerateReqInput(rid, ids, p, text, now, token_type_ids=types)
            )
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


def _text(prompt: PromptType) -> str:
    """A cross-encoder prompt's text (a string, or a dict with 'prompt')."""
    return prompt.get("prompt") if isinstance(prompt, dict) else prompt


def _pooled(finished: list[tuple[str, list[Req]]]) -> list[tuple[str, list]]:
    """(rid, the pooling model's output) per request; RuntimeError if one failed."""
    outs = []
    for i, (rid, seqs) in enumerate(finished):
        req = seqs[0]
        if req.pooled is None:
            reason = req.finished_reason
            raise RuntimeError(f"prompt {i} failed: {reason.message if reason else reason}")
        outs.append((rid, req.pooled))
    return outs


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
