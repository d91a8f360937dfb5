"""All-reduce and all-gather through shared memory, for CPU ranks on one machine.

Why: gloo's all-reduce of one decode step's [1, hidden] activations takes ~1.5 ms on a 2-core
machine (TCP, a ring, thread hand-offs), and a step has two per layer. Here each rank copies
its tensor into its slot of a shared buffer, raises its flag, waits (spinning) until every
rank has raised it, and sums the slots itself in rank order, so every rank holds bitwise the
same result.

    shared memory:  flags [size] (int64, one per 64-byte line) | buffer 0: slot 0 .. slot size-1
                                                               | buffer 1: slot 0 .. slot size-1

Call k uses buffer k % 2. A rank writes buffer k % 2 again at call k + 2, which it reaches only
after every rank raised its flag for call k + 1, that is, after every rank finished reading
call k's slots: one wait per call is enough. Stores are ordered on x86-64 (the data before the
flag), which is why the path is taken there only; tensors larger than a slot, other CPUs and
ranks on several machines use gloo.
"""

from __future__ import annotations

import os
import platform
import time
from multiprocessing import shared_memory

import numpy as np
import torch
import torch.distributed as dist

SLOT_BYTES = 8 << 20
FLAG_STRIDE = 8  # int64s per flag: one cache line each
SPINS_BEFORE_YIELD = 20000
LIVENESS_CHECK_S = 1.0


def shm_supported() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and os.environ.get("LMPROG_TP_SHM", "1") != "0"


class ShmComm:
    def __init__(self, shm: shared_memory.SharedMemory, rank: int, size: int, pids: list[int]):
        self.shm, self.rank, self.size, self.pids = shm, rank, size, pids
        self.flags = np.ndarray((size * FLAG_STRIDE,), dtype=np.int64, buffer=shm.buf)
        self.data_offset = size * FLAG_STRIDE * 8
        self.seq = 0
        self._slots: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}

    @classmethod
    def create(cls, rank: int, size: int, cpu_group: object) -> ShmComm:
        """Rank 0 creates the segment and names it to the others; it is unlinked once all have
        mapped it, so nothing is left in /dev/shm whatever happens to the ranks later."""
        nbytes = size * FLAG_STRIDE * 8 + 2 * size * SLOT_BYTES
        shm = shared_memory.SharedMemory(create=True, size=nbytes) if rank == 0 else None
        names: list = [None] * size
        dist.all_gather_object(names, (shm.name if shm else None, os.getpid()), group=cpu_group)
        if shm is None:
            shm = shared_memory.SharedMemory(name=names[0][0])
        dist.barrier(group=cpu_group)
        if rank == 0:
            shm.unlink()
        comm = cls(shm, rank, size, [pid for _, pid in names])
        comm.flags[rank * FLAG_STRIDE] = 0
        return comm

    def fits(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.numel() * x.element_size() <= SLOT_BYTES

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums `x` (contiguous, `fits`) over the ranks in place, in rank order."""
        slots = self._exchange(x)
        flat = x.view(-1)
        flat.copy_(slots[0])
        for slot in slots[1:]:
            flat.add_(slot)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' `x` (contiguous, `fits`) concatenated along the last dimension."""
        slots = self._exchange(x)
        return torch.cat([slot.view(x.shape) for slot in slots], dim=-1)

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Publishes `x` in this rank's slot and returns every rank's, once all are there."""
        self.seq += 1
        buf, n = self.seq % 2, x.numel()
        self._slot(buf, self.rank, x.dtype)[:n].copy_(x.reshape(-1))
        self.flags[self.rank * FLAG_STRIDE] = self.seq
        self._wait(self.seq)
        return [self._slot(buf, r, x.dtype)[:n] for r in range(self.size)]

    def _wait(self, seq: int) -> None:
        flags = self.flags[::FLAG_STRIDE]
        spins = 0
        next_check = None
        while (flags < seq).any():
            spins += 1
            if spins < SPINS_BEFORE_YIELD:
                continue
            os.sched_yield()  # more ranks than free cores: let the one we wait for run
            now = time.monotonic()
            if next_check is None:
                next_check = now + LIVENESS_CHECK_S
            elif now > next_check:
                self._check_peers()
                next_check = now + LIVENESS_CHECK_S

    def _check_peers(self) -> None:
        for rank, pid in enumerate(self.pids):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                raise RuntimeError(f"tensor-parallel rank {rank} (pid {pid}) is gone") from None

    def _slot(self, buf: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
        key = (buf, rank, dtype)
        if key not in self._slots:
            offset = self.data_offset + (buf * self.size + rank) * SLOT_BYTES
            itemsize = torch.empty((), dtype=dtype).element_size()
            self._slots[key] = torch.frombuffer(
                self.shm.buf, dtype=dtype, count=SLOT_BYTES // itemsize, offset=offset
            )
        return self._slots[key]

    def close(self) -> None:
        self._slots.clear()
        self.flags = None
        try:
            self.shm.close()
        except BufferError:  # a caller still holds a view: the mapping goes with the process
            pass
