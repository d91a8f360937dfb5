"""The two KV memory pools.

    ReqToTokenPool[req_slot, pos] -> kv_slot     (a request's row: where each of its tokens' KV lives)
    TokenToKVPool.k_buffer[layer][kv_slot]       (the K/V of one token, one layer: [kv_heads, head_dim])

Requests never copy KV: they hold kv slot indices. Which kv slots are free is the allocator's
business (allocator.py); these pools only store.

Under tensor parallelism rank 0's pools record what changes their contents in `journal` (a
list the other ranks replay on their own pools before the next forward: distributed/step_sync.py).

KV slots [0, page_size) are reserved as a padding page: index tables of a batch are padded with
slot 0, which is never handed out, so padded reads are harmless and padded writes hit no live data.
"""

from __future__ import annotations

import torch

from lmprog.runtime.host_copy import to_device_packed


class ReqToTokenPool:
    """Maps (request slot, token position) to the KV slot holding that token's KV."""

    def __init__(self, size: int, max_context_len: int, device: torch.device | str) -> None:
        assert size >= 1 and max_context_len >= 1, (size, max_context_len)
        self.size = size
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        # Host record of each row's furthest written position and its slot, so the allocator
        # learns where a request's last page ends without reading the device table.
        self._tail: list[tuple[int, int]] = [(-1, 0)] * (size + 1)
        # One more row than slots: `padding_row`, all zeros and never handed out, is what padded
        # batch rows (CUDA graph buckets) point at, so they read KV slot 0 of the padding page.
        self.padding_row = size
        self.req_to_token = torch.zeros(
            (size + 1, max_context_len), dtype=torch.int64, device=device
        )
        self._free: list[int] = list(range(size))
        self.journal: list | None = None

    def available_size(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        """A free request slot, or None when all are taken."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._tail[slot] = (-1, 0)
        return slot

    def free(self, slot: int) -> None:
        assert 0 <= slot < self.size and slot not in self._free, f"bad free of req slot {slot}"
        self._free.append(slot)

    def write(self, slot: int, start: int, kv_slots: torch.Tensor) -> None:
        """Records that positions [start, start + len(kv_slots)) of request `slot` live in
        `kv_slots` (host int64)."""
        self.write_runs([slot], [start], [kv_slots.numel()], kv_slots)

    def write_runs(
        self, slots: list[int], starts: list[int], lens: list[int], kv_slots: torch.Tensor
    ) -> None:
        """`write` for several requests in one device copy: request slots[i]'s positions
        [starts[i], starts[i] + lens[i]) live in the next lens[i] entries of `kv_slots` (host
        int64, the runs concatenated)."""
        assert kv_slots.device.type == "cpu", "KV slots are written from the host"
        assert sum(lens) == kv_slots.numel(), f"{sum(lens)} positions, {kv_slots.numel()} slots"
        end = max((s + n for s, n in zip(starts, lens)), default=0)
        assert end <= self.max_context_len, f"position {end} > context {self.max_context_len}"
        taken = 0
        for slot, start, n in zip(slots, starts, lens):
            taken += n
            if n and start + n - 1 >= self._tail[slot][0]:
                self._tail[slot] = (start + n - 1, int(kv_slots[taken - 1]))
        if not taken:
            return
        if self.journal is not None:
            self.journal.append(
                ("req_to_token", "write_runs", (list(slots), list(starts), list(lens), kv_slots))
            )
        counts = torch.tensor(lens)
        run_starts = torch.cumsum(counts, 0) - counts
        shift = torch.repeat_interleave(run_starts - torch.tensor(starts), counts)
        cols = torch.arange(taken) - shift
        flat = torch.repeat_interleave(torch.tensor(slots), counts) * self.max_context_len + cols
        index, values = to_device_packed([flat, kv_slots], torch.int64, self.device)
        self.req_to_token.view(-1)[index] = values

    def last_slot(self, slot: int, kv_len: int) -> int:
        """The KV slot of position kv_len - 1 of request `slot` (0 when it has no KV), read
        from the host record rather than the device table."""
        if kv_len == 0:
            return 0
        pos, kv_slot = self._tail[slot]
        assert pos == kv_len - 1, (
            f"request row {slot}: last written position {pos}, not {kv_len - 1}"
        )
        return kv_slot

    def check_integrity(self) -> None:
        assert len(set(self._free)) == len(self._free), "a request slot was freed twice"


class TokenToKVPool:
    """Per-layer K and V buffers of shape [num_slots, kv_heads, head_dim], indexed by KV slot."""

    def __init__(
        self,
        size: int,
        page_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        v_head_dim: int | None = None,
    ) -> None:
        self.size = size  # usable slots, excluding the padding page
        self.page_size = page_size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        rows = size + page_size
        # torch.empty: pages are touched (and so really allocated) only when first written.
        self.k_buffer = [
            torch.empty((rows, num_kv_heads, head_dim), dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        self.v_buffer = [
            torch.empty((rows, num_kv_heads, self.v_head_dim), dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        self.journal: list | None = None
        # The padding page is read by padded gathers: keep it finite.
        for buf in (*self.k_buffer, *self.v_buffer):
            buf[:page_size].zero_()

    @staticmethod
    def bytes_per_token(
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        v_head_dim: int | None = None,
    ) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return num_layers * num_kv_heads * (head_dim + (v_head_dim or head_dim)) * elem

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffer[layer_id], self.v_buffer[layer_id]

    def set_kv_buffer(
        self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Writes the K/V of tokens ([T, kv_heads, head_dim]) into slots `loc` ([T])."""
        if k.dtype != self.dtype:
            k, v = k.to(self.dtype), v.to(self.dtype)
        self.k_buffer[layer_id][loc] = k
        self.v_buffer[layer_id][loc] = v

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copies the K/V of slots `src` into slots `dst`, in every layer."""
        if self.journal is not None:
            self.journal.append(("token_to_kv", "copy_slots", (src.cpu(), dst.cpu())))
        for buf in (*self.k_buffer, *self.v_buffer):
            buf[dst] = buf[src]
