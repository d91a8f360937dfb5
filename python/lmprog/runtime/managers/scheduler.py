"""The Scheduler: one loop of recv -> schedule -> run -> process, shared by the offline `LLM`
(stepped in-process) and the server (behind ZMQ).

Each step is either a prefill (extend) batch of newly admitted requests, or one decode step of
every running request; new requests join between decode steps (continuous batching). This module
admits and schedules; what a step's result does to its sequences is batch_result.py's.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import deque

import torch

from lmprog.runtime.distributed.parallel_state import TpOutOfStepError
from lmprog.runtime.layers.sampler import Sampler
from lmprog.runtime.managers.batch_result import FAULT_ENV, BatchResultMixin
from lmprog.runtime.managers.detokenizer import OutputText
from lmprog.runtime.managers.grammar_manager import GrammarManager
from lmprog.runtime.managers.io_struct import (
    FinishReason,
    TokenizedGenerateReqInput,
)
from lmprog.runtime.managers.kv_accounting import check_integrity, kv_stats
from lmprog.runtime.managers.prefill_adder import (
    INIT_NEW_TOKEN_RATIO,
    MIN_NEW_TOKEN_RATIO,
    NEW_TOKEN_RATIO_DECAY,
    AddResult,
    PrefillAdder,
    estimated_need,
    running_reserve,
)
from lmprog.runtime.managers.prompt_logprobs import prompt_logits_indices
from lmprog.runtime.managers.schedule_batch import (
    Req,
    ScheduledBatch,
    build_encode_batch,
    build_forward_batch,
)
from lmprog.runtime.managers.schedule_policy import prioritize, retraction_order
from lmprog.runtime.managers.scheduler_stats import SchedulerStats
from lmprog.runtime.managers.validation import (
    RequestLimits,
    validate_pooling_request,
    validate_request,
)
from lmprog.runtime.mem_cache.base import BasePrefixCache
from lmprog.runtime.mem_cache.chunk_cache import ChunkCache
from lmprog.runtime.mem_cache.radix_cache import RadixCache
from lmprog.runtime.mem_cache.tree_view import record_hit, tree_view
from lmprog.runtime.model_executor.forward_batch import ForwardMode
from lmprog.runtime.model_executor.model_runner import ModelRunner
from lmprog.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)
_EMPTY = torch.empty(0, dtype=torch.int64)


class Scheduler(BatchResultMixin):
    def __init__(self, server_args: ServerArgs, model_runner: ModelRunner | None = None) -> None:
        self.server_args = server_args
        self.model_runner = model_runner or ModelRunner(server_args)
        mr = self.model_runner
        self.tokenizer = mr.tokenizer
        self.device = mr.device
        self.context_len = mr.context_len
        self.vocab_size = mr.vocab_size
        self.is_embedding = mr.is_embedding  # a pooling model: no generation
        self.per_token = mr.pooling_task is not None and mr.pooling_task.per_token
        self.req_to_token_pool = mr.req_to_token_pool
        self.allocator = mr.allocator
        # Per-token outputs need every token computed: no prefix of theirs may come cached.
        no_reuse = server_args.disable_radix_cache or self.per_token
        cache_class = ChunkCache if no_reuse else RadixCache
        self.tree_cache: BasePrefixCache = cache_class(self.req_to_token_pool, self.allocator)
        self.sampler = Sampler()
        self.eos_token_ids = frozenset(self._eos_ids())
        self.rng = random.Random(server_args.seed)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.chunked_req: Req | None = None  # a prompt being prefilled across batches
        self._last_was_prefill = False
        self._failed: list[Req] = []  # failed outside a batch; reported by the next step()
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self.stats = SchedulerStats()
        self.grammars = GrammarManager(
            self.tokenizer,
            self.vocab_size,
            self.eos_token_ids,
            server_args.grammar_cache_size,
        )
        # A test hook: the sequences of requests whose id contains this fail in their step.
        self._fault_rid = os.environ.get(FAULT_ENV) or None

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (
            self.model_runner.config,
            getattr(self.model_runner.loaded, "generation_config", None),
        ):
            eos = getattr(source, "eos_token_id", None)
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # ---- requests in ----------------------------------------------------------------------
    @property
    def limits(self) -> RequestLimits:
        args = self.server_args
        return RequestLimits(
            vocab_size=self.vocab_size,
            context_len=self.context_len,
            max_total_tokens=self.model_runner.max_total_tokens,
            page_size=args.page_size,
            max_logprobs=args.max_logprobs,
            max_running_requests=args.max_running_requests,
        )

    def validate(self, input_ids: list[int], params) -> int:
        """Checks a request (ValueError naming the field and the limit); returns its max new
        tokens, max_tokens clipped to the context (the HTTP routes refused longer ones)."""
        if self.is_embedding:
            mr = self.model_runner
            kv_limit = None if mr.is_encoder else mr.max_total_tokens
            validate_pooling_request(input_ids, self.vocab_size, self.context_len, kv_limit)
            return 1
        return validate_request(input_ids, params, self.limits)

    def add_request(self, recv: TokenizedGenerateReqInput) -> None:
        params = recv.sampling_params
        max_new = self.validate(recv.input_ids, params)
        seed = params.seed if params.seed is not None else self.rng.getrandbits(63)
        input_ids = list(recv.input_ids)
        if self.is_embedding:
            input_ids = self.model_runner.model.pooled_input(input_ids)
        req = Req(
            rid=recv.rid,
            origin_input_ids=input_ids,
            sampling_params=params,
            seed=seed,
            max_new_tokens=max_new,
            output_text=self._output_text(recv.input_ids, params),
            eos_token_ids=self.eos_token_ids,
            input_text=recv.input_text,
            stream=recv.stream,
            prefill_only=recv.prefill_only or self.is_embedding,
            token_type_ids=recv.token_type_ids,
        )
        req.times.arrival = recv.arrival_time
        self.grammars.attach(req, jump_forward=not self.server_args.disable_jump_forward)
        if params.prompt_logprobs is not None:
            req.input_logprob_start = min(max(recv.logprob_start_len, 0), len(req.fill_ids))
            if req.input_logprob_start == 0:
                req.record_input_logprobs([(None, {})])  # the first token has no context
        self.waiting.append(req)

    def check_grammar(self, params) -> None:
        """Compiles a request's grammar now; raises ValueError if it does not compile. The
        offline engine calls it before enqueueing anything."""
        self.grammars.check(params)

    def _output_text(self, prompt_ids: list[int], params) -> OutputText:
        return OutputText(
            self.tokenizer,
            prompt_ids,
            params.stop or [],
            params.include_stop_str_in_output,
            params.skip_special_tokens,
            params.spaces_between_special_tokens,
        )

    def abort_request(self, rid: str) -> None:
        """Ends request `rid` wherever it is; it is reported finished with reason 'abort'."""
        for req in [*self.waiting, *self.active_requests()]:
            if req.rid == rid and not req.finished:
                req.finish(FinishReason("abort", message="aborted by the client"))

    # ---- the loop -------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked_req)

    def step(self) -> list[Req]:
        """Runs one step; returns the requests that gained a token or finished in it."""
        self.grammars.poll(self.waiting)
        done = self._collect_aborted()
        batch = self.schedule()
        done += self._failed
        self._failed = []
        if batch is not None:
            done += self._run_batch(batch)
        else:
            self.grammars.wait_for_one(self.waiting)
        if self.server_args.debug_checks and not self.has_work():
            self.check_integrity()
        return done

    def _run_batch(self, batch: ScheduledBatch) -> list[Req]:
        """Runs the model on a batch and processes the result. A fault in the batched work
        (the forward, sampling) fails the batch's sequences; a fault in one sequence's own
        processing fails that sequence alone (`_advance`). Either way the engine goes on,
        unless tensor-parallel ranks fell out of step (TpOutOfStepError), which ends it."""
        try:
            logits = self.model_runner.forward(batch.forward_batch)
            return self.process_batch_result(batch, logits)
        except TpOutOfStepError:
            raise
        except Exception as e:  # the failure is reported to its requests
            logger.exception("a %s step of %d sequences failed", batch.mode.name, len(batch.seqs))
            return self._fail_batch(batch, e)

    def schedule(self) -> ScheduledBatch | None:
        """The next batch: a prefill of admitted requests if any, else a decode step of every
        running request. While a long prompt is prefilled in chunks, prefill and decode steps
        alternate, so running requests keep streaming."""
        if self.model_runner.is_encoder:
            return self._schedule_encode()
        interleave = self.chunked_req is not None and self.running and self._last_was_prefill
        makers = (self._schedule_decode, self._schedule_prefill)
        for make in makers if interleave else reversed(makers):
            batch = make()
            if batch is not None:
                self._last_was_prefill = batch.mode.is_extend
                return batch
        return None

    def _schedule_prefill(self) -> ScheduledBatch | None:
        if not self.waiting and self.chunked_req is None:
            return None
        args = self.server_args
        reserve = running_reserve(self.running, self.new_token_ratio, args.page_size)
        chunk_size = args.chunked_prefill_size
        adder = PrefillAdder(
            rem_tokens=self.allocator.available_size() + self.tree_cache.evictable_size - reserve,
            budget=min(args.max_prefill_tokens, chunk_size)
            if chunk_size > 0
            else args.max_prefill_tokens,
            free_req_slots=self.req_to_token_pool.available_size(),
            page_size=args.page_size,
            new_token_ratio=self.new_token_ratio,
            chunk=chunk_size > 0,
            dedupe=self.tree_cache.shares_prefixes,
        )
        if self.chunked_req is not None:
            # Admitted earlier: what it still needs is set aside first, and its next chunk
            # comes out of that.
            adder.rem_tokens -= estimated_need(
                self.chunked_req, self.chunked_req.kv_len, self.new_token_ratio, args.page_size
            )
            if not adder.add_chunked(self.chunked_req):
                return None
        ordered, matches = prioritize(list(self.waiting), args.schedule_policy, self.tree_cache)
        admitted = set()
        for req in ordered:
            if adder.full:
                break
            if req.grammar_future is not None:
                continue  # its grammar is still compiling
            match = matches.get(req) or self.tree_cache.match_prefix(req.match_key)
            lock_cost = self.tree_cache.lock_cost(match.last_node)
            result = adder.try_add(req, match.kv_indices.numel(), lock_cost)
            if result is AddResult.NO_ROOM and not (adder.reqs or self.active_requests()):
                # Nothing else holds room, so it never will fit: fail it rather than block
                # the queue behind it (validation should have refused it).
                self._refuse_unfittable(req)
                admitted.add(req)
                continue
            if result is AddResult.NO_ROOM:
                break
            if result is AddResult.DEFERRED:
                continue
            self._admit(req, match)
            admitted.add(req)
        if admitted:
            self.waiting = deque(r for r in self.waiting if r not in admitted)
        if not adder.reqs:
            return None
        batch = self._build(ForwardMode.EXTEND, adder.reqs, adder.ends)
        if batch is None:
            # Only a chunk continuation can miss room (running requests outgrew their estimate
            # since its admission): it retries after the next decode step.
            assert admitted == set(), f"admission overcommitted the KV pool: {self.kv_stats()}"
            return None
        last, last_end = adder.reqs[-1], adder.ends[-1]
        self.chunked_req = last if last_end < len(last.fill_ids) else None
        self.stats.prefill_steps += 1
        self.stats.prefill_tokens += batch.forward_batch.num_tokens
        return batch

    def _schedule_encode(self) -> ScheduledBatch | None:
        """An encoder's step: waiting requests in arrival order, whole (no KV, no chunks),
        within the prefill token budget and the running-request limit."""
        if not self.waiting:
            return None
        args = self.server_args
        reqs, tokens = [], 0
        while self.waiting and len(reqs) < args.max_running_requests:
            n = len(self.waiting[0].origin_input_ids)
            if reqs and tokens + n > args.max_prefill_tokens:
                break
            req = self.waiting.popleft()
            req.times.first_scheduled = time.time()
            reqs.append(req)
            tokens += n
        fb = build_encode_batch(reqs, self.device)
        self.stats.prefill_steps += 1
        self.stats.prefill_tokens += tokens
        return ScheduledBatch(ForwardMode.ENCODE, reqs, fb)

    def _refuse_unfittable(self, req: Req) -> None:
        message = (
            f"the request can never be admitted: it needs {req.family} request slots and "
            f"about {estimated_need(req, 0, self.new_token_ratio, self.server_args.page_size)} "
            f"KV slots with nothing else running; the engine has "
            f"{self.req_to_token_pool.available_size()} request slots and "
            f"{self._room()} KV slots"
        )
        logger.error("%s (request %s)", message, req.rid)
        req.finish(FinishReason("error", message=message))
        self._failed.append(req)

    def _admit(self, req: Req, match) -> None:
        req.req_pool_idx = self.req_to_token_pool.alloc()
        assert req.req_pool_idx is not None, "admission counted request slots wrongly"
        req.prefix_indices, req.last_node = match.kv_indices, match.last_node
        self.tree_cache.inc_lock_ref(req.last_node)
        n_cached = match.kv_indices.numel()
        if n_cached:
            self.req_to_token_pool.write(req.req_pool_idx, 0, match.kv_indices)
        req.kv_len = n_cached
        if req.times.first_scheduled is None:  # first admission (not a retracted one's)
            req.times.first_scheduled = time.time()
            req.num_cached_tokens = n_cached
            self.stats.cache_query_tokens += len(req.origin_input_ids)
            self.stats.cache_hit_tokens += n_cached
            if n_cached and isinstance(self.tree_cache, RadixCache):
                record_hit(match.last_node)

    def _schedule_decode(self) -> ScheduledBatch | None:
        if not self.running:
            return None
        self._make_room_for_decode()
        if not self.running:
            return None
        self.new_token_ratio = max(
            MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY
        )
        ends = [len(r.fill_ids) for r in self.running]
        batch = self._build(ForwardMode.DECODE, self.running, ends)
        assert batch is not None, f"decode found no KV room after retraction: {self.kv_stats()}"
        self.stats.decode_steps += 1
        return batch

    def _build(self, mode: ForwardMode, reqs: list[Req], ends: list[int]) -> ScheduledBatch | None:
        spans = [r.input_logprob_rows(e) for r, e in zip(reqs, ends)] if mode.is_extend else None
        starts = [r.kv_len for r in reqs]
        # A decode step where a grammar forced several tokens runs as an extend of each
        # request's new tokens (one or more), and is processed as a decode step.
        several = mode.is_decode and any(e > s + 1 for s, e in zip(starts, ends))
        fb = build_forward_batch(
            ForwardMode.EXTEND if several else mode,
            reqs,
            ends,
            self.req_to_token_pool,
            self._alloc_extend,
            self.device,
        )
        if fb is None:
            return None
        if spans is not None and any(b > a for a, b in spans):
            fb.logits_indices = prompt_logits_indices(fb, spans, starts)
        else:
            spans = None
        return ScheduledBatch(mode, list(reqs), fb, spans)

    def _alloc_extend(
        self, prefix_lens: list[int], seq_lens: list[int], last_locs: list[int]
    ) -> torch.Tensor | None:
        """KV slots for these positions, evicting cached prefixes if the free list is short."""
        short = self.allocator.extend_need(prefix_lens, seq_lens) - self.allocator.available_size()
        if short > 0:
            self.tree_cache.evict(short)
        return self.allocator.alloc_extend(prefix_lens, seq_lens, last_locs)

    # ---- memory pressure ------------------------------------------------------------------
    def _room(self) -> int:
        return self.allocator.available_size() + self.tree_cache.evictable_size

    def _make_room_for_decode(self) -> None:
        """Retracts running requests until one decode step of the rest fits: those that made
        the least progress go first (fewest generated tokens; then the longest prompt, which
        frees the most). A request that cannot fit even alone is failed with an error."""

        def need() -> int:
            return self.allocator.extend_need(
                [r.kv_len for r in self.running], [len(r.fill_ids) for r in self.running]
            )

        if need() <= self._room():
            return
        victims = retraction_order(self.running, self.chunked_req)
        retracted = []
        while need() > self._room():
            if len(victims) == 1:
                self.running.remove(victims[0])
                self._fail_too_large(victims[0])
                break
            victim = victims.pop(0)
            if victim is self.chunked_req:
                self.chunked_req = None
            else:
                self.running.remove(victim)
            self._retract(victim)
            retracted.append(victim)
        if retracted:
            self.new_token_ratio = 1.0
            # Back to the front of the queue, the most advanced first.
            self.waiting.extendleft(retracted)
            logger.info("KV pool full: retracted %d requests (%s)", len(retracted), self.kv_stats())

    def _retract(self, req: Req) -> None:
        """Sends a running request back to the waiting queue. It keeps its generated tokens;
        its KV goes to the prefix cache (evictable), so it is recomputed only if evicted."""
        self.tree_cache.cache_finished_req(req)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.req_pool_idx, req.kv_len = None, 0
        req.prefix_indices, req.last_node = _EMPTY, None
        self.stats.retracted_requests += 1

    def _fail_too_large(self, req: Req) -> None:
        message = (
            f"the KV pool ({self.allocator.size} slots, max_total_tokens) cannot hold this "
            f"request's next token: it has {req.kv_len + 1} tokens and nothing else runs"
        )
        req.finish(FinishReason("abort", message=message))
        self._release(req)
        self._failed.append(req)

    def active_requests(self) -> list[Req]:
        """Requests holding KV: the running ones and a prompt being prefilled in chunks."""
        return self.running + ([self.chunked_req] if self.chunked_req is not None else [])

    def _collect_aborted(self) -> list[Req]:
        aborted = [r for r in [*self.waiting, *self.active_requests()] if r.finished]
        for req in aborted:
            self._release(req)
        if aborted:
            self.waiting = deque(r for r in self.waiting if not r.finished)
            self.running = [r for r in self.running if not r.finished]
            if self.chunked_req is not None and self.chunked_req.finished:
                self.chunked_req = None
        return aborted

    def flush_cache(self) -> bool:
        """Drops every cached prefix; refused (False) while requests are in flight."""
        if self.has_work():
            return False
        self.tree_cache.reset()
        assert self.allocator.available_size() == self.allocator.size, self.kv_stats()
        return True

    # ---- accounting -----------------------------------------------------------------------
    def kv_stats(self) -> dict[str, int]:
        return kv_stats(self)

    def cache_tree(self) -> dict | None:
        """The prefix cache's top levels for the dashboard (mem_cache/tree_view.py); None
        without a radix cache."""
        if not isinstance(self.tree_cache, RadixCache):
            return None
        return tree_view(self.tree_cache.root, self.tokenizer.decode)

    def check_integrity(self) -> None:
        """Asserts the KV accounting (kv_accounting.py)."""
        check_integrity(self)
