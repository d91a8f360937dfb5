"""Admission order (fcfs, lpm, dfs-weight) and the prefill adder, on a real RadixCache and
allocator with exact token ids; no model."""

from __future__ import annotations

import pytest
import torch

from lmprog.runtime.managers.prefill_adder import (
    IN_BATCH_SHARE_MIN,
    AddResult,
    PrefillAdder,
    estimated_need,
)
from lmprog.runtime.managers.schedule_batch import Req
from lmprog.runtime.managers.schedule_policy import prioritize
from lmprog.runtime.mem_cache.allocator import TokenToKVPoolAllocator
from lmprog.runtime.mem_cache.chunk_cache import ChunkCache
from lmprog.runtime.mem_cache.radix_cache import RadixCache
from lmprog.runtime.sampling.sampling_params import SamplingParams


def make_req(name: str, tokens: list[int], max_new: int = 8, n: int = 1) -> Req:
    return Req(
        rid=name,
        origin_input_ids=list(tokens),
        sampling_params=SamplingParams(max_tokens=max_new, n=n),
        seed=0,
        max_new_tokens=max_new,
        output_text=None,  # not read by scheduling
        eos_token_ids=frozenset(),
    )


def make_cache(*sequences: list[int], size: int = 256) -> RadixCache:
    allocator = TokenToKVPoolAllocator(size)
    cache = RadixCache(None, allocator)
    for seq in sequences:
        slots = allocator.alloc(len(seq))
        cached = cache.insert(seq, slots)
        allocator.free(slots[:cached])
    return cache


def names(reqs: list[Req]) -> list[str]:
    return [r.rid for r in reqs]


# ---- policies ---------------------------------------------------------------------------------
def test_fcfs_keeps_arrival_order_and_matches_nothing_upfront():
    cache = make_cache([1, 2, 3, 4])
    waiting = [make_req("a", [9, 9]), make_req("b", [1, 2, 3, 4, 5])]
    order, matches = prioritize(waiting, "fcfs", cache)
    assert names(order) == ["a", "b"] and matches == {}


def test_lpm_orders_by_longest_cached_prefix_then_arrival():
    cache = make_cache(list(range(1, 11)), [20, 21, 22, 23, 24, 25])
    waiting = [
        make_req("none", [30, 31, 32]),
        make_req("four", [1, 2, 3, 4, 99]),
        make_req("ten", [*range(1, 11), 50]),
        make_req("six", [20, 21, 22, 23, 24, 25, 60]),
        make_req("four-again", [1, 2, 3, 4, 98]),
    ]
    order, matches = prioritize(waiting, "lpm", cache)
    assert names(order) == ["ten", "six", "four", "four-again", "none"]
    # The match excludes each prompt's last token (it is always computed).
    assert [matches[r].kv_indices.numel() for r in order] == [10, 6, 4, 4, 0]


def test_dfs_weight_keeps_subtrees_together_heaviest_first():
    # root -[1 2 3]-> P -[4 5]-> A ; P -[6 7]-> B
    cache = make_cache([1, 2, 3, 4, 5], [1, 2, 3, 6, 7])
    waiting = [
        make_req("b1", [1, 2, 3, 6, 7, 40]),
        make_req("cold", [50, 51]),
        make_req("a1", [1, 2, 3, 4, 5, 41]),
        make_req("p1", [1, 2, 3, 8, 42]),
        make_req("a2", [1, 2, 3, 4, 5, 43]),
        make_req("a3", [1, 2, 3, 4, 5, 44]),
    ]
    order, _ = prioritize(waiting, "dfs-weight", cache)
    # Subtree of P (weight 5) before the cold request at the root; inside it A (3) before
    # B (1), and P's own request after its children.
    assert names(order) == ["a1", "a2", "a3", "b1", "p1", "cold"]


def test_cache_aware_policies_fall_back_to_fcfs_without_prefix_sharing():
    allocator = TokenToKVPoolAllocator(64)
    cache = ChunkCache(None, allocator)
    waiting = [make_req("a", [1, 2]), make_req("b", [1, 2, 3])]
    for policy in ("lpm", "dfs-weight"):
        order, matches = prioritize(waiting, policy, cache)
        assert names(order) == ["a", "b"] and matches == {}


# ---- prefill adder ----------------------------------------------------------------------------
def make_adder(**kw) -> PrefillAdder:
    defaults = {
        "rem_tokens": 10_000,
        "budget": 100,
        "free_req_slots": 8,
        "page_size": 1,
        "new_token_ratio": 0.5,
        "chunk": True,
        "dedupe": True,
    }
    return PrefillAdder(**{**defaults, **kw})


def test_estimated_need_counts_uncached_prompt_and_ratio_of_new_tokens():
    req = make_req("a", list(range(40)), max_new=10, n=1)
    assert estimated_need(req, cached_len=30, ratio=0.5, page_size=1) == 10 + 5
    fam = make_req("f", list(range(40)), max_new=10, n=3)
    # page 4: prompt slack 3, each sequence 5 + 3, two copied partial pages 3 each
    assert estimated_need(fam, cached_len=0, ratio=0.5, page_size=4) == 43 + 3 * 8 + 2 * 3


def test_adder_admits_within_budget_and_chunks_the_request_that_overflows():
    adder = make_adder(budget=100)
    assert adder.try_add(make_req("a", list(range(60))), 0, 0) is AddResult.ADMITTED
    long = make_req("b", list(range(1000, 1090)))
    assert adder.try_add(long, 0, 0) is AddResult.CHUNKED
    assert adder.ends == [60, 40] and adder.full
    assert adder.try_add(make_req("c", [7, 8]), 0, 0) is AddResult.NO_ROOM


def test_chunk_ends_on_a_page_boundary_unless_it_completes_the_prompt():
    adder = make_adder(budget=10, page_size=4)
    assert adder.try_add(make_req("a", list(range(30))), 0, 0) is AddResult.CHUNKED
    assert adder.ends == [8]  # 10 tokens of budget, cut back to 2 whole pages
    req = adder.reqs[0]
    req.kv_len = 8
    nxt = make_adder(budget=100, page_size=4)
    assert nxt.add_chunked(req) and nxt.ends == [30]


def test_without_chunking_only_the_first_request_may_exceed_the_budget():
    adder = make_adder(budget=50, chunk=False)
    assert adder.try_add(make_req("a", list(range(80))), 0, 0) is AddResult.ADMITTED
    assert adder.try_add(make_req("b", [1, 2]), 0, 0) is AddResult.NO_ROOM


def test_adder_stops_at_kv_room_counting_the_lock_cost_and_request_slots():
    # need = 20 prompt + ceil(0.5 * 8) = 24, + 10 evictable slots the lock would protect
    req = make_req("a", list(range(20)))
    assert make_adder(rem_tokens=33).try_add(req, 0, 10) is AddResult.NO_ROOM
    assert make_adder(rem_tokens=34).try_add(req, 0, 10) is AddResult.ADMITTED
    fam = make_req("f", [1, 2, 3], n=4)
    assert make_adder(free_req_slots=3).try_add(fam, 0, 0) is AddResult.NO_ROOM


def test_in_batch_dedupe_defers_requests_sharing_an_uncached_prefix():
    shared = list(range(100, 100 + IN_BATCH_SHARE_MIN))
    adder = make_adder(budget=1000)
    assert adder.try_add(make_req("a", [*shared, 1]), 0, 0) is AddResult.ADMITTED
    assert adder.try_add(make_req("b", [*shared, 2]), 0, 0) is AddResult.DEFERRED
    # A shorter overlap, or one that is already cached, does not defer.
    assert adder.try_add(make_req("c", [*shared[:-1], 3, 3]), 0, 0) is AddResult.ADMITTED
    assert adder.try_add(make_req("d", [*shared, 4]), 1, 0) is AddResult.ADMITTED
    assert names(adder.reqs) == ["a", "c", "d"]


@pytest.mark.parametrize("policy", ["fcfs", "lpm", "dfs-weight"])
def test_every_policy_returns_each_waiting_request_once(policy):
    cache = make_cache([1, 2, 3, 4], [1, 2, 5, 6], [7, 8])
    g = torch.Generator().manual_seed(0)
    waiting = [
        make_req(
            str(i),
            torch.randint(
                1, 9, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g
            ).tolist(),
        )
        for i in range(20)
    ]
    order, _ = prioritize(waiting, policy, cache)
    assert sorted(names(order), key=int) == names(waiting)
    cache.check_integrity()
