"""RadixCache: a radix tree over token ids whose nodes own the KV slots of their tokens.

Each edge holds a run of tokens and the KV slots of those tokens; a path from the root spells a
cached prefix. Inserting a sequence that diverges inside an edge splits the edge there:

    root ──[1 2 3 4 5]── A           insert [1 2 3 9 9]        root ──[1 2 3]── P ──[4 5]── A
                                     ────────────────────>                      └──[9 9]── B

With `page_size` > 1 keys are cut to whole pages and edges split only on page boundaries, so
every KV page belongs to exactly one node (the allocator frees whole pages).

Locks are reference counts along a path: `inc_lock_ref(node)` protects the node and every
ancestor (the tokens a request reads). A node with `lock_ref == 0` is *evictable*; eviction
removes least-recently-used unlocked leaves first. Invariant:
`evictable_size + protected_size == tokens in the tree`, and along any path a child's
lock_ref never exceeds its parent's.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from lmprog.runtime.mem_cache.allocator import TokenToKVPoolAllocator
from lmprog.runtime.mem_cache.base import BasePrefixCache, MatchResult
from lmprog.runtime.mem_cache.memory_pool import ReqToTokenPool

if TYPE_CHECKING:
    from lmprog.runtime.managers.schedule_batch import Req

_EMPTY = torch.empty(0, dtype=torch.int64)


class TreeNode:
    __slots__ = ("children", "heat", "hits", "key", "last_access", "lock_ref", "parent", "value")

    def __init__(self, key: list[int], value: torch.Tensor, parent: TreeNode | None) -> None:
        self.children: dict[int | tuple[int, ...], TreeNode] = {}
        self.parent = parent
        self.key = key  # the edge's tokens
        self.value = value  # their KV slots, int64 [len(key)] on CPU
        self.lock_ref = 0
        self.last_access = 0
        self.hits = 0  # admitted requests that reused this node's tokens
        self.heat = (0.0, 0.0)  # (recent hits, decayed to this time.monotonic()): tree_view.py

    def __lt__(self, other: TreeNode) -> bool:  # heap order: least recently used first
        return self.last_access < other.last_access

    def __repr__(self) -> str:
        return f"TreeNode(len={len(self.key)}, lock_ref={self.lock_ref})"


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (slice compares run in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class RadixCache(BasePrefixCache):
    shares_prefixes = True

    def __init__(
        self,
        req_to_token_pool: ReqToTokenPool | None,
        allocator: TokenToKVPoolAllocator,
    ) -> None:
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator
        self.page_size = allocator.page_size
        self._clock = itertools.count(1)
        self.reset()

    # ---- keys -----------------------------------------------------------------------------
    def _child_key(self, key: list[int]) -> int | tuple[int, ...]:
        return key[0] if self.page_size == 1 else tuple(key[: self.page_size])

    def _aligned(self, n: int) -> int:
        return n // self.page_size * self.page_size

    def _match_len(self, a: list[int], b: list[int]) -> int:
        return self._aligned(common_prefix_len(a, b))

    # ---- lookup and insert ----------------------------------------------------------------
    def match_prefix(self, token_ids: list[int]) -> MatchResult:
        """Slots of the longest cached page-aligned prefix of `token_ids`. A match that ends
        inside an edge splits it, so `last_node` covers exactly the matched tokens."""
        key = list(token_ids[: self._aligned(len(token_ids))])
        node, values, pos = self.root, [], 0
        now = next(self._clock)
        node.last_access = now
        while pos < len(key):
            child = node.children.get(self._child_key(key[pos:]))
            if child is None:
                break
            n = self._match_len(child.key, key[pos : pos + len(child.key)])
            partial = n < len(child.key)
            if partial:
                child = self._split(child, n)
            child.last_access = now
            values.append(child.value)
            node, pos = child, pos + n
            if partial:
                break
        kv = torch.cat(values) if values else _EMPTY
        return MatchResult(kv, node)

    def insert(self, token_ids: list[int], kv_slots: torch.Tensor) -> int:
        """Adds `token_ids` (page-aligned) with their slots; returns how many leading tokens
        were already cached. Those slots of `kv_slots` are duplicates the tree did not take:
        the caller frees them."""
        assert len(token_ids) == kv_slots.numel(), (len(token_ids), kv_slots.numel())
        assert len(token_ids) % self.page_size == 0, "insert of a partial page"
        key, value = list(token_ids), kv_slots.to("cpu", torch.int64)
        node, pos = self.root, 0
        now = next(self._clock)
        while pos < len(key):
            child = node.children.get(self._child_key(key[pos:]))
            if child is None:
                leaf = TreeNode(key[pos:], value[pos:].clone(), node)
                leaf.last_access = now
                node.children[self._child_key(leaf.key)] = leaf
                self._evictable += len(leaf.key)
                return pos
            n = self._match_len(child.key, key[pos : pos + len(child.key)])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            node, pos = child, pos + n
        return pos

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cuts `child`'s edge after `n` tokens; returns the new upper node (same locks)."""
        parent = child.parent
        upper = TreeNode(child.key[:n], child.value[:n], parent)
        upper.lock_ref, upper.last_access = child.lock_ref, child.last_access
        upper.hits, upper.heat = child.hits, child.heat
        parent.children[self._child_key(upper.key)] = upper
        child.key, child.value, child.parent = child.key[n:], child.value[n:], upper
        upper.children[self._child_key(child.key)] = child
        return upper

    # ---- locks ----------------------------------------------------------------------------
    def inc_lock_ref(self, node: TreeNode | None) -> None:
        while node is not None and node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def lock_cost(self, node: TreeNode | None) -> int:
        cost = 0
        while node is not None and node is not self.root and node.lock_ref == 0:
            cost += len(node.key)
            node = node.parent
        return cost

    def dec_lock_ref(self, node: TreeNode | None) -> None:
        while node is not None and node is not self.root:
            assert node.lock_ref > 0, f"unlocking unlocked {node}"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node.key)
                self._evictable += len(node.key)
            node = node.parent

    # ---- requests -------------------------------------------------------------------------
    def cache_unfinished_req(self, req: Req) -> None:
        """Inserts the request's computed KV so far; its row then reads the tree's slots
        (duplicates it computed are freed) and its lock moves to the new last node."""
        idx, old_len = req.req_pool_idx, req.prefix_indices.numel()
        end = self._aligned(req.kv_len)
        if end <= old_len:
            return
        tokens = req.fill_ids[:end]
        row = self.req_to_token_pool.req_to_token[idx, :end].clone()
        cached = self.insert(tokens, row)
        self.allocator.free(row[old_len:cached])
        match = self.match_prefix(tokens)
        assert match.kv_indices.numel() == end, "inserted tokens must match in full"
        self.req_to_token_pool.write(idx, old_len, match.kv_indices[old_len:])
        # Lock the new path before unlocking the old one, so shared ancestors never look free.
        self.inc_lock_ref(match.last_node)
        self.dec_lock_ref(req.last_node)
        req.prefix_indices, req.last_node = match.kv_indices, match.last_node

    def cache_finished_req(self, req: Req) -> None:
        """Inserts the request's KV (prompt + output, whole pages), frees the duplicates and
        the partial last page, and releases its lock."""
        idx, old_len = req.req_pool_idx, req.prefix_indices.numel()
        row = self.req_to_token_pool.req_to_token[idx, : req.kv_len].clone()
        end = self._aligned(req.kv_len)  # >= old_len: the cached prefix is whole pages
        cached = self.insert(req.fill_ids[:end], row[:end])
        self.allocator.free(row[old_len:cached])
        self.allocator.free(row[end:])
        self.dec_lock_ref(req.last_node)
        req.last_node = None

    # ---- eviction -------------------------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Frees least-recently-used unlocked leaves until `num_tokens` slots are freed (or
        nothing evictable is left); a parent left childless and unlocked becomes a leaf."""
        heap = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            leaf = heapq.heappop(heap)
            self.allocator.free(leaf.value)
            freed += len(leaf.key)
            self._evictable -= len(leaf.key)
            parent = leaf.parent
            del parent.children[self._child_key(leaf.key)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, parent)
        return freed

    def locked_nodes(self) -> int:
        return sum(1 for node in self._nodes() if node.lock_ref)

    def cached_slots(self) -> torch.Tensor:
        values = [node.value for node in self._nodes()]
        return torch.cat(values) if values else _EMPTY

    def _nodes(self) -> Iterator[TreeNode]:
        """Every node but the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # ---- sizes and checks -----------------------------------------------------------------
    @property
    def evictable_size(self) -> int:
        return self._evictable

    @property
    def protected_size(self) -> int:
        return self._protected

    @property
    def total_size(self) -> int:
        return self._evictable + self._protected

    def reset(self) -> None:
        """Frees every cached slot; only valid when no request holds a lock."""
        if hasattr(self, "root"):
            assert self._protected == 0, f"reset with {self._protected} protected slots"
            self.evict(self._evictable)
        self.root = TreeNode([], _EMPTY, None)
        self.root.lock_ref = 1  # the root is never evicted
        self._evictable = 0
        self._protected = 0

    def check_integrity(self) -> None:
        evictable = protected = 0
        slots = []
        for node in self._nodes():
            assert len(node.key) == node.value.numel() > 0, f"{node}: key/value lengths differ"
            assert len(node.key) % self.page_size == 0, f"{node}: not whole pages"
            assert node.lock_ref >= 0, f"{node}: negative lock count"
            parent = node.parent
            assert parent.children.get(self._child_key(node.key)) is node, f"{node}: bad link"
            if parent is not self.root:
                assert node.lock_ref <= parent.lock_ref, f"{node} locked more than its parent"
            if node.lock_ref:
                protected += len(node.key)
            else:
                evictable += len(node.key)
            slots.append(node.value)
        assert (evictable, protected) == (self._evictable, self._protected), (
            f"sizes drifted: counted evictable={evictable} protected={protected}, "
            f"kept {self._evictable} and {self._protected}"
        )
        if slots:
            pages = torch.cat(slots) // self.page_size
            assert int(pages.min()) >= 1, "the tree holds the padding page"
            assert torch.unique(pages).numel() * self.page_size == pages.numel(), (
                "a KV page is owned by two nodes"
            )
            assert not self.allocator.is_free(pages).any(), "the tree holds a free KV page"
