"""What a step's result does to its sequences: the Scheduler's half that runs after the forward.

A step's logits (or pooled rows, for a pooling model) become each sequence's next token, its
logprobs and stop checks; a prefill caches what it computed and forks `n` > 1 requests into
their sequences; finished sequences give their KV to the prefix cache (or back to the
allocator after an internal error). A fault in the batched work fails the batch's sequences; a
fault in one sequence's own processing fails that sequence alone.

`BatchResultMixin` holds these methods of `Scheduler` (scheduler.py), which owns the state they
use: the pools and prefix cache, the running list, the sampler, the grammars and the stats.
"""

from __future__ import annotations

import itertools
import logging
import time

import torch

from lmprog.runtime.layers.sampler import SamplerOutput
from lmprog.runtime.managers.io_struct import FinishReason, internal_error
from lmprog.runtime.managers.prompt_logprobs import record_prompt_logprobs
from lmprog.runtime.managers.schedule_batch import Req, ScheduledBatch
from lmprog.runtime.sampling.constrained.matcher import apply_masks
from lmprog.runtime.sampling.sampling_batch_info import SamplingBatchInfo
from lmprog.runtime.sampling.seeded_random import derive_seed

logger = logging.getLogger(__name__)
# A test hook: the sequences of requests whose id contains this variable's value fail in their
# step (read once by the Scheduler).
FAULT_ENV = "LMPROG_FAULT_INJECT_RID"


class BatchResultMixin:
    """The Scheduler's result processing (see the module docstring)."""

    def process_batch_result(self, batch: ScheduledBatch, logits: torch.Tensor) -> list[Req]:
        if self.is_embedding:
            return self._finish_pooled(batch, logits)
        rows, done = batch.reqs, []
        if batch.prompt_rows is not None:
            logits = record_prompt_logprobs(batch.reqs, batch.prompt_rows, logits)
        if batch.mode.is_extend:
            rows, logits, done = self._after_prefill(batch.reqs, logits)
            batch.seqs = rows + done  # its forks too: a failure from here on ends them all
            if not rows:
                return done
        info = SamplingBatchInfo.from_rows(
            [r.sampling_params for r in rows],
            [r.seed for r in rows],
            [r.output_ids for r in rows],
            [r.origin_input_ids for r in rows],
            self.eos_token_ids,
            self.vocab_size,
            logits.device,
        )
        matchers = [r.matcher for r in rows]
        if any(m is not None for m in matchers):
            apply_masks(logits, matchers)
        out = self.sampler(logits, info).to_host()
        next_ids = out.next_token_ids.tolist()
        for i, (req, token) in enumerate(zip(rows, next_ids)):
            try:
                self._advance(req, token, out, i)
            except Exception as e:  # this sequence fails; the batch goes on
                logger.exception("sequence %s/%d failed", req.rid, req.index)
                req.finish(internal_error(e))
        self.stats.generated_tokens += len(rows)
        for req in rows:
            if req.finished:
                self._release(req)
        if batch.mode.is_extend:
            self.running.extend(r for r in rows if not r.finished)
        else:
            self.running = [r for r in self.running if not r.finished]
        return done + rows

    def _advance(self, req: Req, token: int, out: SamplerOutput, row: int) -> None:
        """One sequence's share of a step: its logprobs, its new token (stop checks, grammar,
        detokenization) and what its grammar forces next."""
        if self._fault_rid is not None and self._fault_rid in req.rid:
            raise RuntimeError(f"fault injected into request {req.rid} ({FAULT_ENV})")
        if out.logprobs is not None and req.sampling_params.logprobs is not None:
            req.record_logprob(*out.row_logprobs(row, req.sampling_params.logprobs))
        req.append_token(token, self.context_len)
        if req.jump_forward and not req.finished:
            forced = self.grammars.jump_forward(req, self.context_len)
            self.stats.jump_forward_tokens += forced
            self.stats.generated_tokens += forced

    def _fail_batch(self, batch: ScheduledBatch, error: Exception) -> list[Req]:
        """Ends every sequence of a batch whose step failed (those already finished in it keep
        their reason); their KV is freed, not cached, as it may be half written."""
        seqs = list(dict.fromkeys([*batch.reqs, *batch.seqs]))
        for req in seqs:
            if not req.finished:
                req.finish(internal_error(error))
            self._release(req)
        self.running = [r for r in self.running if not r.finished]
        if self.chunked_req is not None and self.chunked_req.finished:
            self.chunked_req = None
        return seqs

    def fail_all(self, error: Exception) -> list[Req]:
        """Ends every request in flight (the server's last resort when a step fails outside
        any batch); returns them to be reported."""
        reqs = [*self.waiting, *self.active_requests()]
        for req in reqs:
            if not req.finished:
                req.finish(internal_error(error))
            self._release(req)
        self.waiting.clear()
        self.running, self.chunked_req = [], None
        return reqs

    def _finish_pooled(self, batch: ScheduledBatch, pooled: torch.Tensor) -> list[Req]:
        """A pooling step's rows ([B, out], or [T, out] per token): each request whose prompt
        is complete gets its output and finishes. A chunk's row is not an output yet; a
        per-token model's rows of each chunk gather on the request."""
        done = []
        rows = pooled.cpu().tolist()  # one read-back for the batch
        if self.per_token:
            ends = itertools.accumulate(batch.forward_batch.extend_seq_lens_cpu, initial=0)
            rows = [rows[a:b] for a, b in itertools.pairwise(ends)]
        for req, row in zip(batch.reqs, rows):
            req.pooled = (req.pooled or []) + row if self.per_token else row
            if batch.mode.is_extend:
                self.tree_cache.cache_unfinished_req(req)
                if req.kv_len < len(req.fill_ids):
                    continue
            req.finish(FinishReason("length"))
            self._release(req)
            done.append(req)
        return done

    def _after_prefill(
        self, reqs: list[Req], logits: torch.Tensor
    ) -> tuple[list[Req], torch.Tensor, list[Req]]:
        """Caches what each request computed (so later requests reuse it even while this one
        runs); returns the sequences to sample with their logits rows, and the prefill-only
        requests it finished. A chunk's request samples nothing yet; an `n` > 1 request forks
        into its `n` sequences."""
        for req in reqs:
            self.tree_cache.cache_unfinished_req(req)
        prefilled = [r.kv_len == len(r.fill_ids) for r in reqs]
        done = [r for r, p in zip(reqs, prefilled) if p and r.prefill_only]
        for req in done:  # its prompt is cached now; nothing to generate
            req.finish(FinishReason("length"))
            self._release(req)
        complete = [i for i, r in enumerate(reqs) if prefilled[i] and not r.prefill_only]
        if len(complete) < len(reqs):
            logits = logits[complete]
            reqs = [reqs[i] for i in complete]
        counts = [r.family for r in reqs]
        rows = [seq for req in reqs for seq in self._fork(req)]
        if len(rows) > len(reqs):
            logits = logits.repeat_interleave(torch.tensor(counts, device=logits.device), dim=0)
        return rows, logits, done

    def _fork(self, req: Req) -> list[Req]:
        """After its first prefill, a request with n > 1 forks into n sequences sharing the
        prompt's KV slots, which the prefix cache holds (its page-aligned part; a partial last
        page is copied to each sibling)."""
        n, req.family = req.family, 1
        if n == 1:
            return [req]
        family = [req]
        shared = req.prefix_indices.numel()
        tail = req.kv_len - shared
        row = self.req_to_token_pool.req_to_token[req.req_pool_idx]
        for i in range(1, n):
            child = req.fork(
                i,
                derive_seed(req.seed, i),
                self._output_text(req.origin_input_ids, req.sampling_params),
            )
            child.req_pool_idx = self.req_to_token_pool.alloc()
            child.prefix_indices, child.last_node = req.prefix_indices, req.last_node
            self.tree_cache.inc_lock_ref(child.last_node)
            self.req_to_token_pool.write(child.req_pool_idx, 0, req.prefix_indices)
            if tail:
                slots = self._alloc_extend([0], [tail], [0])
                assert slots is not None, "admission reserved the copied tail"
                self.model_runner.token_to_kv_pool.copy_slots(
                    row[shared : req.kv_len], slots.to(row.device)
                )
                self.req_to_token_pool.write(child.req_pool_idx, shared, slots)
            child.kv_len = req.kv_len
            family.append(child)
        return family

    def _release(self, req: Req) -> None:
        """Frees what a finished sequence holds: its KV goes to the prefix cache, or, after an
        internal error, back to the allocator (it may be half written). Idempotent."""
        failed = req.finished_reason is not None and req.finished_reason.internal
        if not failed:
            req.output_text.finish()
        if req.times.finished is None:
            req.times.finished = time.time()
        if req.req_pool_idx is not None:
            if failed:
                self.tree_cache.discard_req(req)
            else:
                self.tree_cache.cache_finished_req(req)
            self.req_to_token_pool.free(req.req_pool_idx)
            req.req_pool_idx = None
