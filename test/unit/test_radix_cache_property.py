"""RadixCache against a reference model, driven by random operation sequences (hypothesis).

Tokens come from a 4-letter alphabet and sequences are at most 12 long, so prefixes collide
often and edges split and merge-by-eviction all the time. The pool is small (48 slots), so
inserts and requests run into eviction.

The reference model is a dict `{page-aligned prefix: KV slots of its last page}` holding every
cached prefix. Insert and the request methods update it independently of the tree; eviction
is not modelled (LRU order is covered by the unit tests): after an eviction the reference is
cut down to what the tree still holds, after checking that only unlocked pages went and that
exactly `freed` slots did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lmprog.runtime.mem_cache.allocator import TokenToKVPoolAllocator
from lmprog.runtime.mem_cache.base import MatchResult
from lmprog.runtime.mem_cache.memory_pool import ReqToTokenPool
from lmprog.runtime.mem_cache.radix_cache import RadixCache, TreeNode

SIZE = 48  # KV slots
MAX_LEN = 12  # tokens in a sequence, and so in any edge
REQ_SLOTS = 3
SEQS = st.lists(st.integers(0, 3), max_size=MAX_LEN)

Prefix = tuple[int, ...]


@dataclass(eq=False)
class ReqState:
    """The fields of a request the prefix cache reads and writes (see schedule_batch.Req)."""

    fill_ids: list[int]
    req_pool_idx: int
    prefix_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    last_node: TreeNode | None = None
    kv_len: int = 0


def spell(node: TreeNode) -> Prefix:
    """The tokens on the path from the root to the end of `node`."""
    keys = []
    while node.parent is not None:
        keys.append(node.key)
        node = node.parent
    return tuple(t for key in reversed(keys) for t in key)


class RadixCacheMachine(RuleBasedStateMachine):
    page_size = 1

    def __init__(self) -> None:
        super().__init__()
        self.allocator = TokenToKVPoolAllocator(SIZE, page_size=self.page_size)
        self.pool = ReqToTokenPool(REQ_SLOTS, MAX_LEN, "cpu")
        self.cache = RadixCache(self.pool, self.allocator)
        self.pages: dict[Prefix, tuple[int, ...]] = {}  # the reference model
        self.locks: list[tuple[TreeNode, Prefix]] = []  # taken by the lock rule
        self.reqs: list[ReqState] = []  # live requests

    # ---- the reference model -------------------------------------------------------------
    def expected_match(self, tokens: list[int]) -> list[int]:
        p, n, slots = self.page_size, 0, []
        while n + p <= len(tokens) and tuple(tokens[: n + p]) in self.pages:
            n += p
            slots.extend(self.pages[tuple(tokens[:n])])
        return slots

    def record(self, tokens: list[int], slots: list[int]) -> None:
        """Pages of `tokens` the reference lacks were just cached with these slots."""
        p = self.page_size
        for end in range(p, len(tokens) // p * p + 1, p):
            self.pages.setdefault(tuple(tokens[:end]), tuple(slots[end - p : end]))

    def tree_pages(self) -> dict[Prefix, tuple[int, ...]]:
        out: dict[Prefix, tuple[int, ...]] = {}
        stack = [(self.cache.root, ())]
        while stack:
            node, prefix = stack.pop()
            for child in node.children.values():
                path = prefix + tuple(child.key)
                slots = child.value.tolist()
                for i in range(0, len(child.key), self.page_size):
                    out[path[: len(prefix) + i + self.page_size]] = tuple(
                        slots[i : i + self.page_size]
                    )
                stack.append((child, path))
        return out

    def locked_prefixes(self) -> list[Prefix]:
        held = [tuple(r.fill_ids[: r.prefix_indices.numel()]) for r in self.reqs]
        return [prefix for _, prefix in self.locks] + held

    def held(self, req: ReqState) -> int:
        p = self.page_size
        return -(-(req.kv_len - req.prefix_indices.numel()) // p) * p

    # ---- operations with their checks ----------------------------------------------------
    def evict(self, n: int) -> int:
        evictable, free = self.cache.evictable_size, self.allocator.available_size()
        freed = self.cache.evict(n)
        if n <= 0:
            assert freed == 0
        else:
            # At least what was asked for (or all there is); at most one leaf too many.
            assert min(n, evictable) <= freed <= evictable, (n, evictable, freed)
            assert freed < n + MAX_LEN, (n, freed)
        assert self.allocator.available_size() == free + freed
        now = self.tree_pages()
        gone = set(self.pages) - set(now)
        assert set(now) <= set(self.pages), "eviction added pages"
        assert len(gone) * self.page_size == freed, (len(gone), freed)
        for prefix in self.locked_prefixes():
            assert not any(prefix[: len(g)] == g for g in gone), f"evicted locked {prefix}"
        freed_slots = torch.tensor([s for g in gone for s in self.pages[g]], dtype=torch.int64)
        assert self.allocator.is_free(freed_slots // self.page_size).all()
        self.pages = {k: v for k, v in self.pages.items() if k in now}
        return freed

    def make_room(self, n: int) -> bool:
        short = n - self.allocator.available_size()
        if short > 0:
            self.evict(short)
        return self.allocator.available_size() >= n

    def match(self, tokens: list[int]) -> MatchResult:
        result = self.cache.match_prefix(tokens)
        assert result.kv_indices.tolist() == self.expected_match(tokens), tokens
        assert spell(result.last_node) == tuple(tokens[: result.kv_indices.numel()])
        return result

    def compute(self, req: ReqState, end: int) -> None:
        """Allocates KV for fill_ids[kv_len:end], evicting if short; skips when it can't."""
        row = self.pool.req_to_token[req.req_pool_idx]
        if end <= req.kv_len or not self.make_room(self.allocator.extend_need([req.kv_len], [end])):
            return
        last = int(row[req.kv_len - 1]) if req.kv_len else 0
        slots = self.allocator.alloc_extend([req.kv_len], [end], [last])
        assert slots is not None
        self.pool.write(req.req_pool_idx, req.kv_len, slots)
        req.kv_len = end

    def query(self, data: st.DataObject, fresh: list[int]) -> list[int]:
        """A fresh sequence, or a cached prefix with a few more tokens (a likely hit)."""
        if self.pages and data.draw(st.booleans()):
            return list(data.draw(st.sampled_from(sorted(self.pages)))) + fresh[:4]
        return fresh

    # ---- rules -------------------------------------------------------------------------------
    @rule(seq=SEQS)
    def insert(self, seq: list[int]) -> None:
        tokens = seq[: len(seq) // self.page_size * self.page_size]
        if not self.make_room(len(tokens)):
            return
        slots = self.allocator.alloc(len(tokens))
        expected = len(self.expected_match(tokens))
        cached = self.cache.insert(tokens, slots)
        assert cached == expected, (tokens, cached, expected)
        self.allocator.free(slots[:cached])
        self.record(tokens, slots.tolist())

    @rule(data=st.data(), fresh=SEQS)
    def match_prefix(self, data: st.DataObject, fresh: list[int]) -> None:
        self.match(self.query(data, fresh))

    @rule(data=st.data(), fresh=SEQS)
    def lock(self, data: st.DataObject, fresh: list[int]) -> None:
        tokens = self.query(data, fresh)
        node = self.match(tokens).last_node
        self.cache.inc_lock_ref(node)
        self.locks.append((node, spell(node)))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        node, _ = self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1)))
        self.cache.dec_lock_ref(node)

    @rule(n=st.integers(-1, 20))
    def evict_some(self, n: int) -> None:
        self.evict(n)

    @precondition(lambda self: not self.locks and not self.reqs)
    @rule()
    def reset(self) -> None:
        self.cache.reset()
        assert self.allocator.available_size() == self.allocator.size
        assert self.cache.root.children == {}
        self.pages = {}

    @precondition(lambda self: len(self.reqs) < REQ_SLOTS)
    @rule(data=st.data(), fresh=SEQS.filter(bool), frac=st.floats(0, 1))
    def start_request(self, data: st.DataObject, fresh: list[int], frac: float) -> None:
        """Admits a request (match, lock) and computes part of it."""
        tokens = self.query(data, fresh)[:MAX_LEN]
        result = self.match(tokens)
        req = ReqState(tokens, self.pool.alloc(), result.kv_indices, result.last_node)
        req.kv_len = req.prefix_indices.numel()
        self.pool.write(req.req_pool_idx, 0, req.prefix_indices)
        self.cache.inc_lock_ref(req.last_node)
        self.reqs.append(req)
        self.compute(req, req.kv_len + round(frac * (len(tokens) - req.kv_len)))

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), frac=st.floats(0, 1))
    def cache_unfinished(self, data: st.DataObject, frac: float) -> None:
        """Computes more of a request, then caches what it has so far (a chunk boundary)."""
        req = data.draw(st.sampled_from(self.reqs))
        self.compute(req, req.kv_len + round(frac * (len(req.fill_ids) - req.kv_len)))
        end = req.kv_len // self.page_size * self.page_size
        own = self.pool.req_to_token[req.req_pool_idx, :end].tolist()
        self.cache.cache_unfinished_req(req)
        self.record(req.fill_ids[:end], own)
        tree = self.expected_match(req.fill_ids[:end])
        assert req.prefix_indices.tolist() == tree, "the request's prefix is the tree's"
        row = self.pool.req_to_token[req.req_pool_idx, : req.kv_len].tolist()
        assert row[:end] == tree, "the request's row reads the tree's slots"
        assert spell(req.last_node) == tuple(req.fill_ids[:end])

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def cache_finished(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(self.reqs))
        end = req.kv_len // self.page_size * self.page_size
        own = self.pool.req_to_token[req.req_pool_idx, :end].tolist()
        self.cache.cache_finished_req(req)
        assert req.last_node is None
        self.record(req.fill_ids[:end], own)
        self.reqs.remove(req)
        self.pool.free(req.req_pool_idx)

    # ---- invariants --------------------------------------------------------------------------
    @invariant()
    def integrity(self) -> None:
        self.cache.check_integrity()
        self.allocator.check_integrity()

    @invariant()
    def tree_holds_exactly_the_reference(self) -> None:
        assert self.tree_pages() == self.pages

    @invariant()
    def every_slot_accounted_for(self) -> None:
        held = sum(self.held(r) for r in self.reqs)
        assert (
            self.allocator.available_size()
            + self.cache.evictable_size
            + self.cache.protected_size
            + held
            == self.allocator.size
        )
        # A request's own pages are neither free nor in the tree.
        p = self.page_size
        for req in self.reqs:
            row = self.pool.req_to_token[req.req_pool_idx]
            own = row[req.prefix_indices.numel() : req.kv_len] // p
            assert not self.allocator.is_free(own).any(), "a request's page is on the free list"
            tree = {s // p for slots in self.pages.values() for s in slots}
            assert not tree & set(own.tolist()), "a request's page is in the tree"

    @invariant()
    def locks_cover_exactly_the_locked_paths(self) -> None:
        locked = self.locked_prefixes()
        p = self.page_size
        protected = {prefix[:end] for prefix in locked for end in range(p, len(prefix) + 1, p)}
        assert protected <= set(self.pages), "a locked page is not cached"
        assert self.cache.protected_size == p * len(protected)
        for node, prefix in self.locks:
            assert spell(node) == prefix, "a locked node moved"
        # Each node's count is the number of locks at or below it.
        stack = [(self.cache.root, ())]
        while stack:
            node, path = stack.pop()
            for child in node.children.values():
                sub = path + tuple(child.key)
                expected = sum(prefix[: len(sub)] == sub for prefix in locked)
                assert child.lock_ref == expected, (sub, child.lock_ref, expected)
                stack.append((child, sub))


class PagedRadixCacheMachine(RadixCacheMachine):
    page_size = 2


SETTINGS = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestRadixCache = RadixCacheMachine.TestCase
TestRadixCache.settings = SETTINGS
TestPagedRadixCache = PagedRadixCacheMachine.TestCase
TestPagedRadixCache.settings = SETTINGS
