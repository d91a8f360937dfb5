"""The tensor-parallel group of this process, and its collectives.

Layers take the group current while the model is built (`building_with`) and keep it, so a
process may hold a tp-1 model beside a sharded one (tests do) without any global switch.

Two process groups: `device_group` carries the tensors of a step (NCCL on CUDA, gloo on CPU);
`cpu_group` (gloo) carries rank 0's step messages. CPU ranks on one machine reduce and gather
through shared memory instead (shm_comm.py: microseconds where gloo takes a millisecond). The step messages wait as long as the
server idles, so their group's timeout is long; a dead peer still fails every wait at once
(gloo sees the socket close), which is what ends a server whose rank died.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lmprog.runtime.distributed.shm_comm import ShmComm, shm_supported

IDLE_TIMEOUT = datetime.timedelta(days=365)  # a step message may be days away


class TpOutOfStepError(RuntimeError):
    """A step failed on rank 0 (a rank was lost, or the forward raised): the ranks no longer
    run in step, so the engine cannot go on; the server exits, an offline LLM refuses more."""


@dataclass(frozen=True)
class TpGroup:
    rank: int = 0
    size: int = 1
    device_group: Any = None
    cpu_group: Any = None
    shm: ShmComm | None = None  # CPU ranks of one machine

    @property
    def is_sharded(self) -> bool:
        return self.size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums `x` over the ranks in place (a row-parallel layer's partial products)."""
        if self.size == 1:
            return x
        if self.shm is not None and self.shm.fits(x) and x.is_contiguous():
            return self.shm.all_reduce(x)
        dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' `x` concatenated along the last dimension, in rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        if self.shm is not None and self.shm.fits(x):
            return self.shm.all_gather_last(x)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int) -> int:
        """The smallest `value` over the ranks (what every rank can afford)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())


SINGLE = TpGroup()
_building: list[TpGroup] = [SINGLE]


@contextlib.contextmanager
def building_with(group: TpGroup) -> Iterator[None]:
    """Makes `group` the one layers built inside take."""
    _building.append(group)
    try:
        yield
    finally:
        _building.pop()


def current_tp() -> TpGroup:
    """The group of the model being built (SINGLE outside `building_with`)."""
    return _building[-1]


def init_tp_group(
    rank: int, size: int, init_addr: str, device_type: str, timeout_s: float, one_machine: bool
) -> TpGroup:
    """Joins the `size` ranks at `init_addr` (host:port; rank 0 listens there) as `rank`.

    `timeout_s` bounds the rendezvous and a step's collectives; ranks that never arrive
    fail the start after it."""
    if dist.is_initialized():
        raise RuntimeError(
            "this process already belongs to a torch.distributed group; tensor parallelism "
            "needs its own (run lmprog's LLM outside torchrun)"
        )
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{init_addr}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    device_group = dist.group.WORLD
    cpu_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    shm = None
    if device_type == "cpu" and one_machine and shm_supported():
        shm = ShmComm.create(rank, size, cpu_group)
    return TpGroup(rank, size, device_group, cpu_group, shm)


def destroy_tp_group(group: TpGroup) -> None:
    if group.shm is not None:
        group.shm.close()
    if group.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
