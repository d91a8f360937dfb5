"""The Scheduler: one loop of recv -> schedule -> run -> process, shared by the offline `LLM`
(stepped in-process) and the server (behind ZMQ).

Each step is either a prefill (extend) batch of newly admitted requests, or one decode step of
every running request; new requests join between decode steps (continuous batching).
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from dataclasses import dataclass

import torch

from lmprog.runtime.layers.sampler import Sampler
from lmprog.runtime.managers.detokenizer import OutputText
from lmprog.runtime.managers.io_struct import FinishReason, TokenizedGenerateReqInput
from lmprog.runtime.managers.schedule_batch import Req, build_forward_batch
from lmprog.runtime.managers.schedule_policy import PrefillAdder, order_waiting
from lmprog.runtime.managers.validation import validate_request
from lmprog.runtime.mem_cache.base import BasePrefixCache
from lmprog.runtime.mem_cache.chunk_cache import ChunkCache
from lmprog.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode
from lmprog.runtime.model_executor.model_runner import ModelRunner
from lmprog.runtime.sampling.sampling_batch_info import SamplingBatchInfo
from lmprog.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed for continuation `index` of a request seeded with `seed` (splitmix64)."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@dataclass
class SchedulerStats:
    """Counters since start (the server's metrics read them)."""

    prefill_tokens: int = 0  # prompt tokens computed (cached ones excluded)
    generated_tokens: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0


@dataclass
class ScheduledBatch:
    mode: ForwardMode
    reqs: list[Req]
    forward_batch: ForwardBatch


class Scheduler:
    def __init__(self, server_args: ServerArgs, model_runner: ModelRunner | None = None) -> None:
        self.server_args = server_args
        self.model_runner = model_runner or ModelRunner(server_args)
        mr = self.model_runner
        self.tokenizer = mr.tokenizer
        self.device = mr.device
        self.context_len = mr.context_len
        self.vocab_size = mr.vocab_size
        self.req_to_token_pool = mr.req_to_token_pool
        self.allocator = mr.allocator
        self.tree_cache: BasePrefixCache = ChunkCache(self.req_to_token_pool, self.allocator)
        self.sampler = Sampler()
        self.eos_token_ids = frozenset(self._eos_ids())
        self.rng = random.Random(server_args.seed)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.stats = SchedulerStats()

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
    def validate(self, input_ids: list[int], params) -> int:
        args = self.server_args
        return validate_request(
            input_ids,
            params,
            self.vocab_size,
            self.context_len,
            self.model_runner.max_total_tokens,
            args.page_size,
            args.max_logprobs,
        )

    def add_request(self, recv: TokenizedGenerateReqInput) -> None:
        params = recv.sampling_params
        max_new = self.validate(recv.input_ids, params)
        seed = params.seed if params.seed is not None else self.rng.getrandbits(63)
        req = Req(
            rid=recv.rid,
            origin_input_ids=list(recv.input_ids),
            sampling_params=params,
            seed=seed,
            max_new_tokens=max_new,
            output_text=self._output_text(recv.input_ids, params),
            eos_token_ids=self.eos_token_ids,
            input_text=recv.input_text,
        )
        req.times.arrival = recv.arrival_time
        self.waiting.append(req)

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
        for req in [*self.waiting, *self.running]:
            if req.rid == rid and not req.finished:
                req.finish(FinishReason("abort", message="aborted by the client"))

    # ---- the loop -------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[Req]:
        """Runs one step; returns the requests that gained a token or finished in it."""
        done = self._collect_aborted()
        batch = self.schedule()
        if batch is None:
            return done
        logits = self.model_runner.forward(batch.forward_batch)
        return done + self.process_batch_result(batch, logits)

    def schedule(self) -> ScheduledBatch | None:
        prefill = self._schedule_prefill()
        if prefill:
            mode, reqs = ForwardMode.EXTEND, prefill
        elif self.running:
            mode, reqs = ForwardMode.DECODE, self.running
        else:
            return None
        fb = build_forward_batch(mode, reqs, self.req_to_token_pool, self.allocator, self.device)
        # Admission reserved every slot a running request may take, so this cannot fail.
        assert fb is not None, f"KV pool exhausted in {mode.value}: {self.kv_stats()}"
        if mode.is_extend:
            self.stats.prefill_steps += 1
            self.stats.prefill_tokens += fb.num_tokens
        else:
            self.stats.decode_steps += 1
        return ScheduledBatch(mode, list(reqs), fb)

    def _schedule_prefill(self) -> list[Req]:
        if not self.waiting:
            return []
        args = self.server_args
        reserved = sum(r.reserved_tokens for r in self.running)
        adder = PrefillAdder(
            self.allocator.available_size() + self.tree_cache.evictable_size - reserved,
            args.max_prefill_tokens,
            args.max_running_requests - len(self.running),
            args.page_size,
        )
        for req in order_waiting(self.waiting, args.schedule_policy):
            match = self.tree_cache.match_prefix(req.origin_input_ids[:-1])
            if not adder.try_add(req, match.kv_indices.numel()):
                break
            self._admit(req, match)
        for req in adder.admitted:
            self.waiting.remove(req)
        return adder.admitted

    def _admit(self, req: Req, match) -> None:
        req.req_pool_idx = self.req_to_token_pool.alloc()
        assert req.req_pool_idx is not None, "admission counted request slots wrongly"
        req.prefix_indices, req.last_node = match.kv_indices, match.last_node
        self.tree_cache.inc_lock_ref(req.last_node)
        n_cached = match.kv_indices.numel()
        if n_cached:
            self.req_to_token_pool.write(req.req_pool_idx, 0, match.kv_indices)
        req.kv_len = req.num_cached_tokens = n_cached
        req.times.first_scheduled = time.time()

    def process_batch_result(self, batch: ScheduledBatch, logits: torch.Tensor) -> list[Req]:
        rows = batch.reqs
        if batch.mode.is_extend:
            rows = [seq for req in batch.reqs for seq in self._fork(req)]
            counts = torch.tensor([r.sampling_params.n for r in batch.reqs], device=logits.device)
            logits = (
                logits.repeat_interleave(counts, dim=0) if len(rows) > len(batch.reqs) else logits
            )
        info = SamplingBatchInfo.from_rows(
            [r.sampling_params for r in rows],
            [r.seed for r in rows],
            [r.output_ids for r in rows],
            [r.origin_input_ids for r in rows],
            self.eos_token_ids,
            self.vocab_size,
            logits.device,
        )
        out = self.sampler(logits, info)
        next_ids = out.next_token_ids.tolist()
        for i, (req, token) in enumerate(zip(rows, next_ids)):
            if out.logprobs is not None and req.sampling_params.logprobs is not None:
                self._record_logprobs(req, i, token, out)
            req.append_token(token, self.context_len)
        self.stats.generated_tokens += len(rows)
        for req in rows:
            if req.finished:
                self._release(req)
        if batch.mode.is_extend:
            self.running.extend(r for r in rows if not r.finished)
        else:
            self.running = [r for r in self.running if not r.finished]
        return rows

    def _record_logprobs(self, req: Req, row: int, token: int, out) -> None:
        k = req.sampling_params.logprobs
        chosen = float(out.logprobs[row])
        top: dict[int, float] = {}
        if k and out.top_logprobs is not None:
            ids = out.top_logprob_ids[row, :k].tolist()
            top = dict(zip(ids, out.top_logprobs[row, :k].tolist()))
        if req.logprobs is None:
            req.logprobs, req.cumulative_logprob = [], 0.0
        req.logprobs.append((chosen, top))
        req.cumulative_logprob += chosen

    def _fork(self, req: Req) -> list[Req]:
        """After its prefill, a request with n > 1 forks into n sequences sharing the prompt's
        KV slots (its page-aligned part; a partial last page is copied to each sibling)."""
        n = req.sampling_params.n
        if n == 1:
            return [req]
        self.tree_cache.cache_unfinished_req(req)
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
                slots = self.allocator.alloc(tail)
                assert slots is not None, "admission reserved the copied tail"
                self.model_runner.token_to_kv_pool.copy_slots(row[shared : req.kv_len], slots)
                self.req_to_token_pool.write(child.req_pool_idx, shared, slots)
            child.kv_len = req.kv_len
            family.append(child)
        return family

    def _release(self, req: Req) -> None:
        req.output_text.finish()
        req.times.finished = time.time()
        if req.req_pool_idx is not None:
            self.tree_cache.cache_finished_req(req)
            self.req_to_token_pool.free(req.req_pool_idx)
            req.req_pool_idx = None

    def _collect_aborted(self) -> list[Req]:
        aborted = [r for r in self.waiting if r.finished]
        aborted += [r for r in self.running if r.finished]
        for req in aborted:
            self._release(req)
        if aborted:
            self.waiting = deque(r for r in self.waiting if not r.finished)
            self.running = [r for r in self.running if not r.finished]
        return aborted

    # ---- accounting -----------------------------------------------------------------------
    def kv_stats(self) -> dict[str, int]:
        held = sum(r.kv_len - r.prefix_indices.numel() for r in self.running)
        return {
            "total": self.allocator.size,
            "free": self.allocator.available_size(),
            "evictable": self.tree_cache.evictable_size,
            "protected": self.tree_cache.protected_size,
            "held_by_requests": held,
            "running_requests": len(self.running),
            "waiting_requests": len(self.waiting),
            "free_request_slots": self.req_to_token_pool.available_size(),
        }

    def check_integrity(self) -> None:
        """Asserts the KV accounting; when idle also that every slot and lock is released."""
        self.allocator.check_integrity()
        self.req_to_token_pool.check_integrity()
        self.tree_cache.check_integrity()
        s = self.kv_stats()
        if self.server_args.page_size == 1:
            # With pages, partly used pages make the running-side sum inexact.
            assert (
                s["free"] + s["evictable"] + s["protected"] + s["held_by_requests"] == s["total"]
            ), s
        if not self.has_work():
            assert s["free"] + s["evictable"] + s["protected"] == s["total"], s
            assert s["protected"] == 0, f"locks held while idle: {s}"
            assert s["free_request_slots"] == self.req_to_token_pool.size, s
