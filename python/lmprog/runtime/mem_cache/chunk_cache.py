"""A prefix cache that reuses nothing across requests (`--disable-radix-cache`).

It still implements sharing *within* a request family: `cache_unfinished_req` turns a request's
KV into a locked node, so the `n` continuations of one prompt share the prompt's slots. A node is
freed the moment its last lock goes: with no reuse, an unlocked prefix is garbage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmprog.runtime.mem_cache.allocator import TokenToKVPoolAllocator
from lmprog.runtime.mem_cache.base import BasePrefixCache, MatchResult
from lmprog.runtime.mem_cache.memory_pool import ReqToTokenPool

if TYPE_CHECKING:
    from lmprog.runtime.managers.schedule_batch import Req


class SharedKV:
    """A chain of shared KV segments: `slots` extend the parent's; locks count along the chain."""

    def __init__(self, slots: torch.Tensor, parent: SharedKV | None) -> None:
        self.slots = slots
        self.parent = parent
        self.lock_ref = 0

    def path(self) -> list[SharedKV]:
        node: SharedKV | None = self
        out = []
        while node is not None:
            out.append(node)
            node = node.parent
        return out


class ChunkCache(BasePrefixCache):
    def __init__(
        self, req_to_token_pool: ReqToTokenPool, allocator: TokenToKVPoolAllocator
    ) -> None:
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator
        self.page_size = allocator.page_size
        self._protected = 0
        self._live: dict[int, SharedKV] = {}  # nodes with locks, by id

    def match_prefix(self, token_ids: list[int]) -> MatchResult:
        return MatchResult(torch.empty(0, dtype=torch.int64), None)

    def inc_lock_ref(self, node: SharedKV | None) -> None:
        for n in node.path() if node is not None else []:
            if n.lock_ref == 0:
                self._protected += n.slots.numel()
                self._live[id(n)] = n
            n.lock_ref += 1

    def dec_lock_ref(self, node: SharedKV | None) -> None:
        for n in node.path() if node is not None else []:
            assert n.lock_ref > 0, "unlocking an unlocked shared KV node"
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._protected -= n.slots.numel()
                del self._live[id(n)]
                self.allocator.free(n.slots)

    def cache_unfinished_req(self, req: Req) -> None:
        start = req.prefix_indices.numel()
        end = req.kv_len // self.page_size * self.page_size
        if end <= start:
            return
        row = self.req_to_token_pool.req_to_token[req.req_pool_idx]
        node = SharedKV(row[start:end].clone(), req.last_node)
        # The new node's lock also holds its ancestors; then the request's old lock on the
        # parent chain is redundant and released (the chain stays protected by the new lock).
        self.inc_lock_ref(node)
        self.dec_lock_ref(req.last_node)
        req.prefix_indices = row[:end].clone()
        req.last_node = node

    def cache_finished_req(self, req: Req) -> None:
        self.discard_req(req)  # nothing outlives the request here

    def locked_nodes(self) -> int:
        return len(self._live)

    def cached_slots(self) -> torch.Tensor:
        slots = [n.slots for n in self._live.values()]
        return torch.cat(slots) if slots else torch.empty(0, dtype=torch.int64)

    def evict(self, num_tokens: int) -> int:
        return 0

    @property
    def evictable_size(self) -> int:
        return 0

    @property
    def protected_size(self) -> int:
        return self._protected

    def reset(self) -> None:
        assert self._protected == 0, f"reset with {self._protected} protected slots"

    def check_integrity(self) -> None:
        assert self._protected >= 0, f"negative protected size {self._protected}"
        assert (self._protected == 0) == (not self._live), "protected slots without locks"
