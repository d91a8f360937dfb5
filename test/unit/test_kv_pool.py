"""KV allocator, pools and the no-reuse prefix cache, with exact slot ids."""

from __future__ import annotations

import pytest
import torch

from lmprog.runtime.mem_cache.allocator import TokenToKVPoolAllocator
from lmprog.runtime.mem_cache.chunk_cache import ChunkCache
from lmprog.runtime.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPool


def ids(t: torch.Tensor | None) -> list[int]:
    assert t is not None
    return t.tolist()


def test_page_size_1_hands_out_low_slots_first_and_never_slot_0() -> None:
    a = TokenToKVPoolAllocator(8, page_size=1)
    assert ids(a.alloc(3)) == [1, 2, 3]
    assert ids(a.alloc(5)) == [4, 5, 6, 7, 8]
    assert a.alloc(1) is None
    a.free(torch.tensor([2, 3]))
    assert a.available_size() == 2
    assert ids(a.alloc(2)) == [2, 3]
    a.check_integrity()


def test_alloc_fails_atomically_when_too_big() -> None:
    a = TokenToKVPoolAllocator(4, page_size=1)
    assert a.alloc(5) is None
    assert a.available_size() == 4


def test_paged_extend_fills_the_partial_last_page_first() -> None:
    a = TokenToKVPoolAllocator(16, page_size=4)  # pages 1..4 -> slots 4..19
    first = a.alloc_extend([0], [6], [0])
    assert ids(first) == [4, 5, 6, 7, 8, 9]
    # 6 tokens cached (last at slot 9); 3 more: slots 10, 11 then a new page (12).
    assert ids(a.alloc_extend([6], [9], [9])) == [10, 11, 12]
    assert a.available_size() == 4  # page 4 left
    # decode of two requests: one mid-page, one at a page boundary.
    assert ids(a.alloc_extend([9, 8], [10, 9], [12, 11])) == [13, 16]
    a.check_integrity()


def test_paged_free_returns_whole_pages() -> None:
    a = TokenToKVPoolAllocator(8, page_size=4)
    slots = a.alloc(5)
    assert ids(slots) == [4, 5, 6, 7, 8]
    assert a.available_size() == 0
    a.free(slots)
    assert a.available_size() == 8
    with pytest.raises(AssertionError, match="freed twice"):
        a.free(slots)
        a.check_integrity()


def test_req_to_token_pool_slots_and_rows() -> None:
    p = ReqToTokenPool(2, 8, "cpu")
    s0, s1 = p.alloc(), p.alloc()
    assert {s0, s1} == {0, 1} and p.alloc() is None
    p.write(s0, 2, torch.tensor([7, 8]))
    assert p.req_to_token[s0, :4].tolist() == [0, 0, 7, 8]
    with pytest.raises(AssertionError, match="context"):
        p.write(s0, 7, torch.tensor([1, 2]))
    p.free(s0)
    assert p.available_size() == 1


def test_kv_pool_write_and_copy() -> None:
    pool = TokenToKVPool(
        8, 1, num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu"
    )
    k = torch.randn(2, 2, 4)
    pool.set_kv_buffer(1, torch.tensor([3, 5]), k, -k)
    pool.copy_slots(torch.tensor([3, 5]), torch.tensor([6, 7]))
    kb, vb = pool.get_kv_buffer(1)
    assert torch.equal(kb[6:8], k) and torch.equal(vb[6:8], -k)
    assert torch.equal(kb[0], torch.zeros(2, 4))  # the padding slot stays zero
    assert TokenToKVPool.bytes_per_token(30, 3, 64, torch.float32) == 46080


class _Req:
    """The fields of a Req that the prefix cache reads and writes."""

    def __init__(self, slot: int, kv_len: int) -> None:
        self.req_pool_idx = slot
        self.kv_len = kv_len
        self.prefix_indices = torch.empty(0, dtype=torch.int64)
        self.last_node = None


def _chunk_cache(size: int = 16, page_size: int = 1):
    a = TokenToKVPoolAllocator(size, page_size)
    p = ReqToTokenPool(4, 32, "cpu")
    return a, p, ChunkCache(p, a)


def test_chunk_cache_matches_nothing_and_frees_finished_requests() -> None:
    a, p, cache = _chunk_cache()
    assert cache.match_prefix([1, 2, 3]).kv_indices.numel() == 0
    req = _Req(p.alloc(), 5)
    p.write(req.req_pool_idx, 0, a.alloc(5))
    cache.cache_finished_req(req)
    assert a.available_size() == 16
    cache.check_integrity()


def test_chunk_cache_shares_a_prefix_until_the_last_lock_goes() -> None:
    a, p, cache = _chunk_cache()
    parent = _Req(p.alloc(), 6)
    p.write(parent.req_pool_idx, 0, a.alloc(6))
    cache.cache_unfinished_req(parent)
    assert ids(parent.prefix_indices) == [1, 2, 3, 4, 5, 6]
    assert cache.protected_size == 6
    child = _Req(p.alloc(), 6)
    child.prefix_indices, child.last_node = parent.prefix_indices, parent.last_node
    cache.inc_lock_ref(child.last_node)
    p.write(child.req_pool_idx, 0, parent.prefix_indices)
    # each continuation decodes two tokens of its own
    for r in (parent, child):
        p.write(r.req_pool_idx, 6, a.alloc(2))
        r.kv_len = 8
    cache.cache_finished_req(parent)
    assert cache.protected_size == 6 and a.available_size() == 16 - 6 - 2
    cache.cache_finished_req(child)
    assert cache.protected_size == 0 and a.available_size() == 16
    cache.check_integrity()


def test_chunk_cache_shares_only_whole_pages() -> None:
    a, p, cache = _chunk_cache(size=16, page_size=4)
    req = _Req(p.alloc(), 6)
    p.write(req.req_pool_idx, 0, a.alloc_extend([0], [6], [0]))
    cache.cache_unfinished_req(req)
    assert ids(req.prefix_indices) == [4, 5, 6, 7]  # the partial second page stays the request's
    cache.cache_finished_req(req)
    assert a.available_size() == 16 and cache.protected_size == 0
