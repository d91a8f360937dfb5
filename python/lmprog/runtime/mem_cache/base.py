"""The prefix-cache interface the scheduler admits requests through.

Ownership of KV slots, at any moment, is exactly one of:
- free              in the allocator;
- held by the cache, and then either *protected* (some request locks the node that holds it) or
  *evictable* (no lock: the cache may give it back to the allocator when asked);
- held by one request (slots past its cached prefix, freed or handed to the cache when it ends).

So `allocator free + evictable + protected + held by requests == total`, and when nothing runs,
`free + evictable + protected == total` (`protected == 0` too, as every lock is released).

Lifecycle of a request, in the scheduler's words:
    match = cache.match_prefix(tokens)        # cached KV slots of the longest cached prefix
    cache.inc_lock_ref(match.last_node)       # protect it while the request runs
    ... allocate and compute only tokens[len(match.kv_indices):] ...
    cache.cache_unfinished_req(req)           # optional: its KV so far becomes a locked prefix
    cache.cache_finished_req(req)             # release: keep what is reusable, free the rest
    cache.discard_req(req)                    # or, when it failed: cache nothing, free its own
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lmprog.runtime.managers.schedule_batch import Req


@dataclass
class MatchResult:
    """What the cache holds of a token sequence: slots of its longest cached (page-aligned)
    prefix and the node to lock while using them."""

    kv_indices: torch.Tensor  # [matched_len] int64
    last_node: Any


class BasePrefixCache(ABC):
    """A cache of token-sequence prefixes to KV slots. Implementations: ChunkCache (no reuse),
    RadixCache (the radix tree). Both keep `req_to_token_pool` and `allocator`."""

    req_to_token_pool: Any
    allocator: Any

    # Whether a prefix cached for one request can serve another (cache-aware scheduling).
    shares_prefixes: bool = False

    @abstractmethod
    def match_prefix(self, token_ids: list[int]) -> MatchResult: ...

    @abstractmethod
    def inc_lock_ref(self, node: Any) -> None:
        """Protects `node` and its ancestors from eviction (reference counted)."""

    @abstractmethod
    def dec_lock_ref(self, node: Any) -> None:
        """Undoes one inc_lock_ref of `node`."""

    def lock_cost(self, node: Any) -> int:
        """Evictable slots that `inc_lock_ref(node)` would protect (room admission loses)."""
        return 0

    @abstractmethod
    def cache_unfinished_req(self, req: Req) -> None:
        """Hands a running request's KV so far (`req.kv_len` tokens, page-aligned part) to the
        cache as a prefix locked for it: updates `req.prefix_indices` and `req.last_node`."""

    @abstractmethod
    def cache_finished_req(self, req: Req) -> None:
        """Releases a finished request's KV: the reusable part stays cached (unlocked), the rest
        returns to the allocator; the request's lock is released."""

    def discard_req(self, req: Req) -> None:
        """Releases a failed request's KV without caching any of it (it may be half written):
        the slots past its cached prefix return to the allocator; its lock is released."""
        row = self.req_to_token_pool.req_to_token[req.req_pool_idx]
        self.allocator.free(row[req.prefix_indices.numel() : req.kv_len])
        self.dec_lock_ref(req.last_node)
        req.last_node = None

    @abstractmethod
    def locked_nodes(self) -> int:
        """How many cache nodes some request holds a lock on."""

    @abstractmethod
    def cached_slots(self) -> torch.Tensor:
        """Every KV slot the cache holds (for integrity checks)."""

    @abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Frees up to `num_tokens` evictable slots; returns how many were freed."""

    @property
    @abstractmethod
    def evictable_size(self) -> int: ...

    @property
    @abstractmethod
    def protected_size(self) -> int: ...

    @abstractmethod
    def reset(self) -> None:
        """Drops everything cached (only when no request holds a lock)."""

    @abstractmethod
    def check_integrity(self) -> None:
        """Asserts the cache's own invariants (non-negative locks, sizes that add up)."""
