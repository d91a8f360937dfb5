"""RadixCache on CPU with exact slot ids, tree shapes, lock counts and eviction order.

The allocator hands out pages from low numbers (page 0 is the padding page) and appends freed
pages to the end of its free list, so every slot id below is predictable:
page_size 1 -> slots 1, 2, 3, ...; page_size 4 -> page 1 is slots 4..7, page 2 is 8..11, ...
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from lmprog.runtime.mem_cache.allocator import TokenToKVPoolAllocator
from lmprog.runtime.mem_cache.memory_pool import ReqToTokenPool
from lmprog.runtime.mem_cache.radix_cache import RadixCache, TreeNode, common_prefix_len

# ---- helpers ----------------------------------------------------------------------------------


def make_cache(size: int = 64, page_size: int = 1) -> tuple[TokenToKVPoolAllocator, RadixCache]:
    allocator = TokenToKVPoolAllocator(size, page_size=page_size)
    cache = RadixCache(ReqToTokenPool(4, 64, "cpu"), allocator)
    return allocator, cache


def insert(allocator: TokenToKVPoolAllocator, cache: RadixCache, tokens: list[int]) -> list[int]:
    """Computes `tokens` from scratch (fresh slots) and caches them, freeing the duplicates the
    tree did not take, as a caller must. Returns the slots that were allocated."""
    slots = allocator.alloc(len(tokens))
    assert slots is not None
    cached = cache.insert(tokens, slots)
    allocator.free(slots[:cached])
    return slots.tolist()


def match(cache: RadixCache, tokens: list[int]) -> list[int]:
    return cache.match_prefix(tokens).kv_indices.tolist()


def child(node: TreeNode, *first: int) -> TreeNode:
    """The child of `node` keyed by `first` (one token at page_size 1, a page otherwise)."""
    return node.children[first[0] if len(first) == 1 else first]


def shape(node: TreeNode) -> dict:
    """The tree below `node` as nested {edge tokens: subtree}."""
    return {tuple(c.key): shape(c) for c in node.children.values()}


def assert_sizes(cache: RadixCache, evictable: int, protected: int) -> None:
    assert (cache.evictable_size, cache.protected_size) == (evictable, protected)
    cache.check_integrity()


# ---- common_prefix_len ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "n"),
    [
        ([], [], 0),
        ([], [1, 2], 0),
        ([1, 2], [], 0),
        ([1, 2, 3], [1, 2, 3], 3),
        ([1, 2], [1, 2, 3], 2),
        ([1, 2, 3], [1, 2], 2),
        ([1, 2, 3], [9, 2, 3], 0),
        ([1, 2, 3], [1, 2, 9], 2),
        ([1, 2, 3, 4], [1, 2, 9, 4, 5], 2),
    ],
)
def test_common_prefix_len_edge_cases(a: list[int], b: list[int], n: int) -> None:
    assert common_prefix_len(a, b) == n


def test_common_prefix_len_every_divergence_point() -> None:
    # The binary search must land on every position, in lists of odd and even lengths.
    for length in range(1, 18):
        a = list(range(length))
        for at in range(length):
            b = a[:at] + [-1] + a[at + 1 :]
            assert common_prefix_len(a, b) == at, (length, at)
            assert common_prefix_len(b, a + [7]) == at, (length, at)


# ---- match and insert -------------------------------------------------------------------------


def test_empty_cache_matches_nothing_at_the_root() -> None:
    _, cache = make_cache()
    result = cache.match_prefix([1, 2, 3])
    assert result.kv_indices.tolist() == []
    assert result.kv_indices.dtype == torch.int64
    assert result.last_node is cache.root
    assert_sizes(cache, 0, 0)


def test_insert_then_match_returns_the_inserted_slots() -> None:
    allocator, cache = make_cache()
    assert insert(allocator, cache, [1, 2, 3, 4, 5]) == [1, 2, 3, 4, 5]
    assert match(cache, [1, 2, 3, 4, 5, 6, 7]) == [1, 2, 3, 4, 5]
    assert match(cache, [1, 2, 3, 4, 5]) == [1, 2, 3, 4, 5]
    assert match(cache, [9, 1, 2]) == []
    assert match(cache, []) == []
    assert allocator.available_size() == 64 - 5
    assert_sizes(cache, 5, 0)


def test_match_ending_inside_an_edge_splits_it() -> None:
    allocator, cache = make_cache()
    insert(allocator, cache, [1, 2, 3, 4, 5])
    result = cache.match_prefix([1, 2, 3, 7])
    assert result.kv_indices.tolist() == [1, 2, 3]
    assert shape(cache.root) == {(1, 2, 3): {(4, 5): {}}}
    upper = child(cache.root, 1)
    assert result.last_node is upper and upper.value.tolist() == [1, 2, 3]
    assert child(upper, 4).value.tolist() == [4, 5]
    assert_sizes(cache, 5, 0)


def test_insert_that_diverges_splits_the_edge_and_frees_nothing_new() -> None:
    allocator, cache = make_cache()
    insert(allocator, cache, [1, 2, 3, 4, 5])
    # Fresh slots 6..10; the first 3 are duplicates of [1, 2, 3] and go back to the allocator.
    assert insert(allocator, cache, [1, 2, 3, 9, 9]) == [6, 7, 8, 9, 10]
    assert shape(cache.root) == {(1, 2, 3): {(4, 5): {}, (9, 9): {}}}
    assert match(cache, [1, 2, 3, 9, 9]) == [1, 2, 3, 9, 10]
    assert match(cache, [1, 2, 3, 4, 5]) == [1, 2, 3, 4, 5]
    assert allocator.available_size() == 64 - 7
    assert_sizes(cache, 7, 0)


def test_insert_returns_the_already_cached_length() -> None:
    _, cache = make_cache()  # slots made up here: only insert's bookkeeping is under test
    assert cache.insert([1, 2, 3], torch.tensor([1, 2, 3])) == 0
    assert cache.insert([1, 2, 3], torch.tensor([7, 8, 9])) == 3  # all duplicates
    assert cache.insert([1, 2], torch.tensor([7, 8])) == 2  # a prefix: splits, adds nothing
    assert shape(cache.root) == {(1, 2): {(3,): {}}}
    assert cache.insert([1, 2, 3, 4, 5], torch.tensor([7, 8, 9, 10, 11])) == 3
    assert cache.insert([1, 5], torch.tensor([7, 12])) == 1
    assert shape(cache.root) == {(1,): {(2,): {(3,): {(4, 5): {}}}, (5,): {}}}
    # The tree kept the first slots it saw for each token.
    assert match(cache, [1, 2, 3, 4, 5]) == [1, 2, 3, 10, 11]
    assert match(cache, [1, 5]) == [1, 12]
    assert cache.insert([], torch.empty(0, dtype=torch.int64)) == 0
    assert cache.total_size == 6


def test_insert_rejects_mismatched_slots() -> None:
    _, cache = make_cache()
    with pytest.raises(AssertionError):
        cache.insert([1, 2, 3], torch.tensor([1, 2]))


# ---- eviction ---------------------------------------------------------------------------------


def test_evict_frees_least_recently_used_leaves_first() -> None:
    allocator, cache = make_cache()
    insert(allocator, cache, [1, 1])  # slots 1, 2
    insert(allocator, cache, [2, 2])  # slots 3, 4
    insert(allocator, cache, [3, 3])  # slots 5, 6
    match(cache, [1, 1])  # [1 1] is now the most recent; [2 2] the least
    assert cache.evict(1) == 2  # a whole leaf goes, even when fewer tokens are asked for
    assert match(cache, [2, 2]) == []
    assert cache.evict(2) == 2
    assert match(cache, [3, 3]) == []
    assert match(cache, [1, 1]) == [1, 2]
    assert allocator.available_size() == 64 - 2
    assert_sizes(cache, 2, 0)
    # Freed pages go to the back of the free list: the next allocation takes fresh slots.
    assert allocator.alloc(1).tolist() == [7]


def test_parent_becomes_evictable_after_its_last_child() -> None:
    allocator, cache = make_cache()
    insert(allocator, cache, [1, 2, 3, 4])
    insert(allocator, cache, [1, 2, 5, 6])
    match(cache, [1, 2, 5, 6])
    assert shape(cache.root) == {(1, 2): {(3, 4): {}, (5, 6): {}}}
    assert cache.evict(1) == 2
    assert shape(cache.root) == {(1, 2): {(5, 6): {}}}
    assert cache.evict(1) == 2
    assert shape(cache.root) == {(1, 2): {}}
    assert cache.evict(1) == 2
    assert shape(cache.root) == {}
    assert cache.evict(1) == 0
    assert allocator.available_size() == 64
    assert_sizes(cache, 0, 0)


def test_a_parent_emptied_during_eviction_goes_before_a_newer_leaf() -> None:
    allocator, cache = make_cache()
    insert(allocator, cache, [1, 2, 3])
    insert(allocator, cache, [1, 2, 4])  # splits: [1 2] -> {[3], [4]}
    insert(allocator, cache, [7, 7])  # the newest
    assert cache.evict(3) == 4  # [3], then [4], then their parent [1 2] (older than [7 7])
    assert shape(cache.root) == {(7, 7): {}}
    assert_sizes(cache, 2, 0)


def test_evict_nothing_or_more_than_cached() -> None:
    allocator, cache = make_cache()
    insert(allocator, cache, [1, 2, 3])
    assert cache.evict(0) == 0
    assert cache.evict(-5) == 0
    assert cache.evict(100) == 3
    assert allocator.available_size() == 64
    assert_sizes(cache, 0, 0)


def test_locked_nodes_are_never_evicted() -> None:
    allocator, cache = make_cache()
    insert(allocator, cache, [1, 2, 3])
    insert(allocator, cache, [4, 5])
    node = cache.match_prefix([1, 2, 3]).last_node
    cache.inc_lock_ref(node)
    assert_sizes(cache, 2, 3)
    assert cache.evict(100) == 2
    assert match(cache, [1, 2, 3]) == [1, 2, 3]
    assert_sizes(cache, 0, 3)
    cache.dec_lock_ref(node)
    assert_sizes(cache, 3, 0)
    assert cache.evict(100) == 3
    assert allocator.available_size() == 64


def test_a_locked_leaf_keeps_its_unlocked_sibling_evictable() -> None:
    allocator, cache = make_cache()
    insert(allocator, cache, [1, 2, 3, 4])
    insert(allocator, cache, [1, 2, 5, 6])
    cache.inc_lock_ref(cache.match_prefix([1, 2, 3, 4]).last_node)
    assert cache.evict(100) == 2  # only [5 6]: [1 2] is protected through its locked child
    assert shape(cache.root) == {(1, 2): {(3, 4): {}}}
    assert_sizes(cache, 0, 4)


def test_a_locked_inner_node_survives_losing_its_children() -> None:
    allocator, cache = make_cache()
    insert(allocator, cache, [1, 2, 3, 4])
    cache.inc_lock_ref(cache.match_prefix([1, 2]).last_node)  # splits: [1 2] locked -> [3 4]
    assert_sizes(cache, 2, 2)
    assert cache.evict(100) == 2
    assert shape(cache.root) == {(1, 2): {}}
    assert match(cache, [1, 2, 3, 4]) == [1, 2]
    assert_sizes(cache, 0, 2)


# ---- locks ------------------------------------------------------------------------------------


def test_lock_counts_along_a_path() -> None:
    allocator, cache = make_cache()
    insert(allocator, cache, [1, 2, 3, 4])
    insert(allocator, cache, [1, 2, 5, 6])
    parent = child(cache.root, 1)
    left, right = child(parent, 3), child(parent, 5)

    cache.inc_lock_ref(left)
    assert (parent.lock_ref, left.lock_ref, right.lock_ref) == (1, 1, 0)
    assert_sizes(cache, 2, 4)
    cache.inc_lock_ref(right)
    assert (parent.lock_ref, left.lock_ref, right.lock_ref) == (2, 1, 1)
    assert_sizes(cache, 0, 6)
    cache.inc_lock_ref(left)
    assert (parent.lock_ref, left.lock_ref, right.lock_ref) == (3, 2, 1)
    assert_sizes(cache, 0, 6)

    cache.dec_lock_ref(right)
    assert (parent.lock_ref, left.lock_ref, right.lock_ref) == (2, 2, 0)
    assert_sizes(cache, 2, 4)
    cache.dec_lock_ref(left)
    cache.dec_lock_ref(left)
    assert (parent.lock_ref, left.lock_ref, right.lock_ref) == (0, 0, 0)
    assert_sizes(cache, 6, 0)
    with pytest.raises(AssertionError, match="unlocking unlocked"):
        cache.dec_lock_ref(left)


def test_locking_the_root_or_nothing_is_a_no_op() -> None:
    allocator, cache = make_cache()
    insert(allocator, cache, [1, 2])
    for node in (cache.root, None):
        cache.inc_lock_ref(node)
        assert_sizes(cache, 2, 0)
        cache.dec_lock_ref(node)
        assert_sizes(cache, 2, 0)
    assert cache.root.lock_ref == 1


def test_splitting_a_locked_edge_keeps_the_lock_on_both_halves() -> None:
    allocator, cache = make_cache()
    insert(allocator, cache, [1, 2, 3, 4, 5])
    node = cache.match_prefix([1, 2, 3, 4, 5]).last_node
    cache.inc_lock_ref(node)
    upper = cache.match_prefix([1, 2]).last_node  # splits the locked edge
    assert upper is not node and upper.key == [1, 2] and node.key == [3, 4, 5]
    assert (upper.lock_ref, node.lock_ref) == (1, 1)
    assert_sizes(cache, 0, 5)
    cache.dec_lock_ref(node)  # the lock taken on the whole edge releases both halves
    assert (upper.lock_ref, node.lock_ref) == (0, 0)
    assert_sizes(cache, 5, 0)


# ---- page_size 4 ------------------------------------------------------------------------------


def test_paged_match_rounds_down_to_whole_pages() -> None:
    allocator, cache = make_cache(page_size=4)
    assert insert(allocator, cache, list(range(1, 9))) == list(range(4, 12))  # pages 1, 2
    assert match(cache, list(range(1, 9))) == list(range(4, 12))
    assert match(cache, [1, 2, 3]) == []  # less than a page
    assert shape(cache.root) == {tuple(range(1, 9)): {}}  # ... and nothing was split
    assert match(cache, [1, 2, 3, 4, 5, 6, 7]) == [4, 5, 6, 7]  # 7 tokens: one whole page
    assert shape(cache.root) == {(1, 2, 3, 4): {(5, 6, 7, 8): {}}}
    assert_sizes(cache, 8, 0)


def test_paged_insert_splits_only_on_page_boundaries() -> None:
    allocator, cache = make_cache(page_size=4)
    insert(allocator, cache, [1, 2, 3, 4, 5, 6, 7, 8])  # slots 4..11
    # Diverges after 6 tokens, i.e. inside the second page: the split is at 4.
    assert insert(allocator, cache, [1, 2, 3, 4, 5, 6, 0, 0]) == list(range(12, 20))
    assert shape(cache.root) == {(1, 2, 3, 4): {(5, 6, 7, 8): {}, (5, 6, 0, 0): {}}}
    upper = child(cache.root, 1, 2, 3, 4)
    assert set(upper.children) == {(5, 6, 7, 8), (5, 6, 0, 0)}  # children keyed by first page
    assert match(cache, [1, 2, 3, 4, 5, 6, 0, 0]) == [4, 5, 6, 7, 16, 17, 18, 19]
    # Page 3 (slots 12..15) duplicated [1 2 3 4] and was freed.
    assert allocator.available_size() == 64 - 12
    assert allocator.is_free(torch.tensor([3])).tolist() == [True]
    # A query diverging inside a page matches only the pages before it.
    assert match(cache, [1, 2, 3, 4, 5, 6, 7, 9]) == [4, 5, 6, 7]
    # Two root children may share a first token: they differ in the first page.
    insert(allocator, cache, [1, 2, 3, 0])
    assert set(cache.root.children) == {(1, 2, 3, 4), (1, 2, 3, 0)}
    assert_sizes(cache, 16, 0)


def test_paged_insert_of_a_partial_page_is_refused() -> None:
    _, cache = make_cache(page_size=4)
    with pytest.raises(AssertionError, match="partial page"):
        cache.insert([1, 2, 3, 4, 5], torch.arange(4, 9))


def test_paged_eviction_returns_whole_pages() -> None:
    allocator, cache = make_cache(page_size=4)
    insert(allocator, cache, list(range(1, 9)))
    insert(allocator, cache, list(range(1, 5)) + [0] * 4)
    assert cache.evict(1) == 4  # the older [5 6 7 8] leaf: one page
    assert cache.evict(5) == 8  # [0 0 0 0], then [1 2 3 4]
    assert allocator.available_size() == 64
    allocator.check_integrity()
    assert_sizes(cache, 0, 0)


# ---- reset and integrity ----------------------------------------------------------------------


def test_reset_frees_everything_back_to_the_allocator() -> None:
    allocator, cache = make_cache(page_size=4)
    insert(allocator, cache, list(range(1, 13)))
    insert(allocator, cache, list(range(1, 5)) + [9] * 8)
    assert allocator.available_size() == 64 - 20
    cache.reset()
    assert allocator.available_size() == 64
    assert match(cache, list(range(1, 13))) == []
    assert shape(cache.root) == {}
    assert_sizes(cache, 0, 0)
    allocator.check_integrity()
    # The cache works again after a reset.
    insert(allocator, cache, [1, 2, 3, 4])
    assert match(cache, [1, 2, 3, 4]) == cache.root.children[(1, 2, 3, 4)].value.tolist()


def test_reset_with_a_lock_held_is_refused() -> None:
    allocator, cache = make_cache()
    insert(allocator, cache, [1, 2])
    cache.inc_lock_ref(cache.match_prefix([1, 2]).last_node)
    with pytest.raises(AssertionError, match="reset with 2 protected"):
        cache.reset()


def two_leaves() -> tuple[TokenToKVPoolAllocator, RadixCache, TreeNode, TreeNode]:
    allocator, cache = make_cache()
    insert(allocator, cache, [1, 2, 3])
    insert(allocator, cache, [1, 2, 4, 5])
    parent = child(cache.root, 1)
    cache.check_integrity()
    return allocator, cache, child(parent, 3), child(parent, 4)


def test_check_integrity_catches_a_negative_lock() -> None:
    _, cache, leaf, _ = two_leaves()
    leaf.lock_ref = -1
    with pytest.raises(AssertionError, match="negative lock"):
        cache.check_integrity()


def test_check_integrity_catches_a_child_locked_more_than_its_parent() -> None:
    _, cache, leaf, _ = two_leaves()
    leaf.lock_ref = 1
    with pytest.raises(AssertionError, match="locked more than its parent"):
        cache.check_integrity()


def test_check_integrity_catches_a_slot_owned_twice() -> None:
    _, cache, _, other = two_leaves()
    other.value = torch.tensor([3, 5])  # slot 3 is also the [3] leaf's
    with pytest.raises(AssertionError, match="owned by two nodes"):
        cache.check_integrity()


def test_check_integrity_catches_a_cached_slot_on_the_free_list() -> None:
    allocator, cache, leaf, _ = two_leaves()
    allocator.free(leaf.value)
    with pytest.raises(AssertionError, match="holds a free KV page"):
        cache.check_integrity()


def test_check_integrity_catches_drifted_sizes() -> None:
    _, cache, _, _ = two_leaves()
    cache._evictable += 1
    with pytest.raises(AssertionError, match="sizes drifted"):
        cache.check_integrity()


def test_check_integrity_catches_key_and_value_of_different_lengths() -> None:
    _, cache, leaf, _ = two_leaves()
    leaf.value = torch.tensor([3, 6])
    with pytest.raises(AssertionError, match="lengths differ"):
        cache.check_integrity()


def test_check_integrity_catches_a_partial_page_node() -> None:
    allocator, cache = make_cache(page_size=4)
    insert(allocator, cache, list(range(1, 9)))
    node = child(cache.root, 1, 2, 3, 4)
    node.key, node.value = node.key[:6], node.value[:6]
    with pytest.raises(AssertionError, match="not whole pages"):
        cache.check_integrity()


# ---- requests ---------------------------------------------------------------------------------


@dataclass(eq=False)
class ReqState:
    """The fields of a request the prefix cache reads and writes (see schedule_batch.Req)."""

    fill_ids: list[int]
    req_pool_idx: int | None = None
    prefix_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    last_node: TreeNode | None = None
    kv_len: int = 0


def admit(cache: RadixCache, tokens: list[int]) -> ReqState:
    """What the scheduler does on admission: match, take a row, lock the matched prefix."""
    req = ReqState(list(tokens))
    result = cache.match_prefix(req.fill_ids)
    req.req_pool_idx = cache.req_to_token_pool.alloc()
    req.prefix_indices, req.last_node = result.kv_indices, result.last_node
    cache.inc_lock_ref(req.last_node)
    cache.req_to_token_pool.write(req.req_pool_idx, 0, result.kv_indices)
    req.kv_len = result.kv_indices.numel()
    return req


def compute(cache: RadixCache, req: ReqState, end: int) -> list[int]:
    """Allocates KV for fill_ids[kv_len:end] (as if the model ran them); returns the slots."""
    row = cache.req_to_token_pool.req_to_token[req.req_pool_idx]
    last = int(row[req.kv_len - 1]) if req.kv_len else 0
    slots = cache.allocator.alloc_extend([req.kv_len], [end], [last])
    assert slots is not None
    cache.req_to_token_pool.write(req.req_pool_idx, req.kv_len, slots)
    req.kv_len = end
    return slots.tolist()


def row(cache: RadixCache, req: ReqState) -> list[int]:
    return cache.req_to_token_pool.req_to_token[req.req_pool_idx, : req.kv_len].tolist()


def held(cache: RadixCache, req: ReqState) -> int:
    """Slots a live request owns itself: whole pages past its cached (page-aligned) prefix."""
    p = cache.page_size
    return -(-(req.kv_len - req.prefix_indices.numel()) // p) * p


def assert_accounted(cache: RadixCache, live: list[ReqState]) -> None:
    allocator = cache.allocator
    mine = sum(held(cache, r) for r in live)
    total = allocator.available_size() + cache.evictable_size + cache.protected_size + mine
    assert total == allocator.size, (
        f"free={allocator.available_size()} evictable={cache.evictable_size} "
        f"protected={cache.protected_size} held={mine} size={allocator.size}"
    )
    cache.check_integrity()
    allocator.check_integrity()


def test_second_request_with_the_same_prompt_frees_its_duplicates() -> None:
    allocator, cache = make_cache()
    prompt = [1, 2, 3, 4, 5, 6]
    # Both are admitted before either is cached, so both compute the whole prompt.
    r1, r2 = admit(cache, prompt), admit(cache, prompt)
    assert compute(cache, r1, 6) == [1, 2, 3, 4, 5, 6]
    assert compute(cache, r2, 6) == [7, 8, 9, 10, 11, 12]
    assert_accounted(cache, [r1, r2])

    cache.cache_finished_req(r1)
    assert r1.last_node is None
    assert allocator.available_size() == 64 - 12
    assert_sizes(cache, 6, 0)
    assert_accounted(cache, [r2])

    cache.cache_finished_req(r2)  # its 6 slots duplicate the tree's
    assert allocator.available_size() == 64 - 6
    assert allocator.is_free(torch.arange(7, 13)).all()
    assert match(cache, prompt) == [1, 2, 3, 4, 5, 6]
    assert_sizes(cache, 6, 0)
    assert_accounted(cache, [])


def test_a_request_reusing_a_cached_prefix_locks_it_then_releases_it() -> None:
    allocator, cache = make_cache()
    first = admit(cache, [1, 2, 3, 4])
    compute(cache, first, 4)
    cache.cache_finished_req(first)

    req = admit(cache, [1, 2, 3, 4, 8, 9])
    assert req.prefix_indices.tolist() == [1, 2, 3, 4]
    assert_sizes(cache, 0, 4)
    assert compute(cache, req, 6) == [5, 6]
    assert row(cache, req) == [1, 2, 3, 4, 5, 6]
    assert_accounted(cache, [req])
    cache.cache_finished_req(req)
    assert shape(cache.root) == {(1, 2, 3, 4): {(8, 9): {}}}
    assert match(cache, [1, 2, 3, 4, 8, 9]) == [1, 2, 3, 4, 5, 6]
    assert allocator.available_size() == 64 - 6
    assert_sizes(cache, 6, 0)
    assert_accounted(cache, [])


def test_paged_finished_request_frees_its_partial_last_page() -> None:
    allocator, cache = make_cache(page_size=4)
    prompt = list(range(1, 11))  # 10 tokens: two whole pages and half of a third
    req = admit(cache, prompt)
    assert compute(cache, req, 10) == list(range(4, 14))  # pages 1, 2, 3
    assert_accounted(cache, [req])
    cache.cache_finished_req(req)
    assert allocator.is_free(torch.tensor([1, 2, 3])).tolist() == [False, False, True]
    assert allocator.available_size() == 64 - 8
    assert match(cache, prompt) == list(range(4, 12))
    assert_sizes(cache, 8, 0)
    assert_accounted(cache, [])

    # The same prompt again: 8 tokens are cached; the 2 left take a fresh page (page 4).
    again = admit(cache, prompt)
    assert again.prefix_indices.tolist() == list(range(4, 12))
    assert_sizes(cache, 0, 8)
    assert compute(cache, again, 10) == [16, 17]
    assert_accounted(cache, [again])
    cache.cache_finished_req(again)
    assert allocator.available_size() == 64 - 8
    assert_sizes(cache, 8, 0)
    assert_accounted(cache, [])


def test_paged_duplicate_requests_free_whole_duplicate_pages() -> None:
    allocator, cache = make_cache(page_size=4)
    prompt = list(range(1, 8))  # 7 tokens: one whole page, three tokens of the next
    r1, r2 = admit(cache, prompt), admit(cache, prompt)
    assert compute(cache, r1, 7) == [4, 5, 6, 7, 8, 9, 10]
    assert compute(cache, r2, 7) == [12, 13, 14, 15, 16, 17, 18]
    cache.cache_finished_req(r1)
    cache.cache_finished_req(r2)
    assert match(cache, prompt) == [4, 5, 6, 7]
    assert allocator.available_size() == 64 - 4
    assert_sizes(cache, 4, 0)
    assert_accounted(cache, [])


def test_unfinished_request_hands_its_prefix_to_the_tree_and_keeps_it_locked() -> None:
    allocator, cache = make_cache()
    req = admit(cache, [1, 2, 3, 4, 5, 6, 7, 8])
    compute(cache, req, 4)  # first chunk
    cache.cache_unfinished_req(req)
    first = req.last_node
    assert req.prefix_indices.tolist() == [1, 2, 3, 4]
    assert first.key == [1, 2, 3, 4] and first.lock_ref == 1
    assert_sizes(cache, 0, 4)
    assert_accounted(cache, [req])

    cache.cache_unfinished_req(req)  # nothing new computed: a no-op
    assert req.last_node is first and first.lock_ref == 1
    assert_sizes(cache, 0, 4)

    compute(cache, req, 8)  # second chunk
    cache.cache_unfinished_req(req)  # the lock moves down the path, not doubled
    assert req.prefix_indices.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert req.last_node.key == [5, 6, 7, 8] and req.last_node.parent is first
    assert (first.lock_ref, req.last_node.lock_ref) == (1, 1)
    assert_sizes(cache, 0, 8)
    assert_accounted(cache, [req])

    cache.cache_finished_req(req)
    assert (first.lock_ref, req.last_node) == (0, None)
    assert allocator.available_size() == 64 - 8
    assert_sizes(cache, 8, 0)
    assert_accounted(cache, [])


def test_unfinished_duplicate_is_freed_and_the_row_reads_the_tree_slots() -> None:
    allocator, cache = make_cache()
    r1, r2 = admit(cache, [1, 2, 3, 4, 5]), admit(cache, [1, 2, 3, 4, 6])
    compute(cache, r1, 4)  # slots 1..4
    compute(cache, r2, 4)  # slots 5..8
    cache.cache_unfinished_req(r1)
    cache.cache_unfinished_req(r2)
    assert row(cache, r2) == [1, 2, 3, 4]
    assert r2.prefix_indices.tolist() == [1, 2, 3, 4]
    assert r1.last_node is r2.last_node and r1.last_node.lock_ref == 2
    assert allocator.is_free(torch.arange(5, 9)).all()
    assert allocator.available_size() == 64 - 4
    assert_sizes(cache, 0, 4)
    assert_accounted(cache, [r1, r2])

    assert compute(cache, r1, 5) == [9]
    assert compute(cache, r2, 5) == [10]
    cache.cache_finished_req(r1)
    assert_sizes(cache, 1, 4)  # [5] is cached unlocked; r2 still locks [1 2 3 4]
    assert_accounted(cache, [r2])
    cache.cache_finished_req(r2)
    assert shape(cache.root) == {(1, 2, 3, 4): {(5,): {}, (6,): {}}}
    assert_sizes(cache, 6, 0)
    assert_accounted(cache, [])


def test_paged_unfinished_request_keeps_its_partial_page() -> None:
    allocator, cache = make_cache(page_size=4)
    req = admit(cache, [1, 2, 3, 4, 5, 6, 7])
    assert compute(cache, req, 6) == [4, 5, 6, 7, 8, 9]
    cache.cache_unfinished_req(req)
    assert req.prefix_indices.tolist() == [4, 5, 6, 7]  # only the whole page is cached
    assert row(cache, req) == [4, 5, 6, 7, 8, 9]  # the request still owns slots 8, 9
    assert allocator.is_free(torch.tensor([2])).tolist() == [False]
    assert_sizes(cache, 0, 4)
    assert_accounted(cache, [req])

    assert compute(cache, req, 7) == [10]  # fills the partial page
    cache.cache_finished_req(req)
    assert allocator.available_size() == 64 - 4
    assert allocator.is_free(torch.tensor([2])).tolist() == [True]
    assert_sizes(cache, 4, 0)
    assert_accounted(cache, [])
