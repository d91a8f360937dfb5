"""Rank 0 tells the other ranks what each step computes.

A step is one message on the cpu group (a pickled `StepHeader`: the mode, the host lengths,
and the pool operations since the last step) and one int64 tensor on the device group (the
step's index tensors, packed; they never come back to the host). On CPU the packed tensor rides
in the header: one broadcast fewer per step.

    packed = input_ids [T] | positions [T] | req_pool_indices [B] | seq_lens [B]
             | extend_prefix_lens [B] | extend_seq_lens [B] | out_cache_loc [S]
             | logits_indices [R] (when set) | token_type_ids [T] (when set)

Pool operations are what the scheduler did to the two pools between forwards (a request row
mapped to KV slots; KV copied to a forked request's own page): each pool records them in the
journal rank 0 gives it, and the other ranks replay them on their own pools before the forward.
A header of None stops the workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lmprog.runtime.distributed.parallel_state import TpGroup
from lmprog.runtime.model_executor.forward_batch import INDEX_FIELDS, ForwardBatch, ForwardMode

# (pool: "req_to_token" or "token_to_kv", method, args), as the pools record them
PoolOp = tuple[str, str, tuple[Any, ...]]


@dataclass
class StepHeader:
    mode: ForwardMode
    prefix_lens: list[int]
    extend_lens: list[int]
    num_tokens: int  # T
    num_slots: int  # S: T, or 0 for an encoder pass that keeps no KV
    num_logit_rows: int | None  # R, or None: the default rows
    token_types: bool
    pool_ops: list[PoolOp]
    packed: torch.Tensor | None = None  # CPU ranks: the index tensors, in the message


class StepSender:
    """Rank 0's end. `journal` is the list the pools append their operations to."""

    def __init__(self, tp: TpGroup) -> None:
        self.tp = tp
        self.journal: list[PoolOp] = []

    def send(self, fb: ForwardBatch) -> None:
        ops = list(self.journal)
        self.journal.clear()
        header = StepHeader(
            mode=fb.forward_mode,
            prefix_lens=list(fb.extend_prefix_lens_cpu),
            extend_lens=list(fb.extend_seq_lens_cpu),
            num_tokens=fb.num_tokens,
            num_slots=int(fb.out_cache_loc.numel()),
            num_logit_rows=None if fb.logits_indices is None else int(fb.logits_indices.numel()),
            token_types=fb.token_type_ids is not None,
            pool_ops=ops,
        )
        parts = [getattr(fb, name) for name in INDEX_FIELDS]
        parts += [t for t in (fb.logits_indices, fb.token_type_ids) if t is not None]
        packed = torch.cat([t.reshape(-1).to(torch.int64) for t in parts])
        if packed.device.type == "cpu":
            header.packed = packed
        self._broadcast(header, packed)

    def stop(self) -> None:
        dist.broadcast_object_list([None], src=0, group=self.tp.cpu_group)

    def _broadcast(self, header: StepHeader, packed: torch.Tensor) -> None:
        try:
            dist.broadcast_object_list([header], src=0, group=self.tp.cpu_group)
            if header.packed is None:
                dist.broadcast(packed, src=0, group=self.tp.device_group)
        except RuntimeError as e:
            raise RuntimeError(f"tensor parallelism: a rank of {self.tp.size} is gone: {e}") from e


def receive_step(tp: TpGroup, runner: Any) -> ForwardBatch | None:
    """A worker's end: the next step's ForwardBatch on `runner`'s device, after replaying the
    pool operations on `runner`'s pools; None when rank 0 says stop."""
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=tp.cpu_group)
    header: StepHeader | None = box[0]
    if header is None:
        return None
    pools = {"req_to_token": runner.req_to_token_pool, "token_to_kv": runner.token_to_kv_pool}
    for pool, method, args in header.pool_ops:
        getattr(pools[pool], method)(*args)
    b, t = len(header.prefix_lens), header.num_tokens
    sizes = [t, t, b, b, b, b, header.num_slots]
    sizes += [header.num_logit_rows] if header.num_logit_rows is not None else []
    sizes += [t] if header.token_types else []
    packed = header.packed
    if packed is None:
        packed = torch.empty(sum(sizes), dtype=torch.int64, device=runner.device)
        dist.broadcast(packed, src=0, group=tp.device_group)
    parts = list(packed.split(sizes))
    index, extra = parts[: len(INDEX_FIELDS)], parts[len(INDEX_FIELDS) :]
    logits_indices = extra.pop(0) if header.num_logit_rows is not None else None
    token_type_ids = extra.pop(0) if header.token_types else None
    return ForwardBatch.from_index_tensors(
        header.mode,
        index,
        header.prefix_lens,
        header.extend_lens,
        logits_indices=logits_indices,
        token_type_ids=token_type_ids,
    )
