"""The two KV memory pools.

    ReqToTokenPool[req_slot, pos] -> kv_slot     (a request's row: where each of its tokens' KV lives)
    TokenToKVPool.k_buffer[layer][kv_slot]       (the K/V of one token, one layer: [kv_heads, head_dim])

Requests never copy KV: they hold kv slot indices. Which kv slots are free is the allocator's
business (allocator.py); these pools only store.

KV slots [0, page_size) are reserved as a padding page: index tables of a batch are padded with
slot 0, which is never handed out, so padded reads are harmless and padded writes hit no live data.
"""

from __future__ import annotations

import torch


class ReqToTokenPool:
    """Maps (request slot, token position) to the KV slot holding that token's KV."""

    def __init__(self, size: int, max_context_len: int, device: torch.device | str) -> None:
        assert size >= 1 and max_context_len >= 1, (size, max_context_len)
        self.size = size
        self.max_context_len = max_context_len
        self.req_to_token = torch.zeros((size, max_context_len), dtype=torch.int64, device=device)
        self._free: list[int] = list(range(size))

    def available_size(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        """A free request slot, or None when all are taken."""
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        assert 0 <= slot < self.size and slot not in self._free, f"bad free of req slot {slot}"
        self._free.append(slot)

    def write(self, slot: int, start: int, kv_slots: torch.Tensor) -> None:
        """Records that positions [start, start + len(kv_slots)) of request `slot` live there."""
        end = start + kv_slots.numel()
        assert end <= self.max_context_len, f"position {end} > context {self.max_context_len}"
        self.req_to_token[slot, start:end] = kv_slots

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
        for buf in (*self.k_buffer, *self.v_buffer):
            buf[dst] = buf[src]
