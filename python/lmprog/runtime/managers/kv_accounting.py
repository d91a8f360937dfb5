"""The scheduler's KV accounting: the numbers it reports and the invariants it asserts.

Every KV page is exactly one of: free in the allocator, held by the prefix cache (protected or
evictable), or held by one running request (its slots past its cached prefix).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lmprog.runtime.managers.scheduler import Scheduler


def kv_stats(sched: Scheduler) -> dict[str, int]:
    held = sum(r.kv_len - r.prefix_indices.numel() for r in sched.active_requests())
    return {
        "total": sched.allocator.size,
        "free": sched.allocator.available_size(),
        "evictable": sched.tree_cache.evictable_size,
        "protected": sched.tree_cache.protected_size,
        "locked_nodes": sched.tree_cache.locked_nodes(),
        "held_by_requests": held,
        "running_requests": len(sched.running),
        "waiting_requests": len(sched.waiting),
        "free_request_slots": sched.req_to_token_pool.available_size(),
    }


def check_integrity(sched: Scheduler) -> None:
    """Asserts the KV accounting: every KV page is exactly one of free, held by the prefix
    cache, or held by one request; when idle, also that every slot and lock is released."""
    sched.allocator.check_integrity()
    sched.req_to_token_pool.check_integrity()
    sched.tree_cache.check_integrity()
    page = sched.server_args.page_size
    rows = sched.req_to_token_pool.req_to_token
    owners = {
        "free": sched.allocator.free_pages(),
        "cache": torch.unique(sched.tree_cache.cached_slots() // page),
    }
    for req in sched.active_requests():
        own = rows[req.req_pool_idx, req.prefix_indices.numel() : req.kv_len]
        owners[f"request {req.rid}/{req.index}"] = torch.unique(own.cpu() // page)
    pages = torch.cat(list(owners.values()))
    if pages.numel() != sched.allocator.num_pages or torch.unique(pages).numel() != pages.numel():
        counts = {k: v.numel() for k, v in owners.items()}
        raise AssertionError(
            f"KV pages lost or owned twice: {counts}, {sched.allocator.num_pages} pages"
        )
    s = sched.kv_stats()
    if page == 1:
        assert s["free"] + s["evictable"] + s["protected"] + s["held_by_requests"] == s["total"], s
    if not sched.has_work():
        assert s["free"] + s["evictable"] + s["protected"] == s["total"], s
        assert s["protected"] == 0, f"locks held while idle: {s}"
        assert s["free_request_slots"] == sched.req_to_token_pool.size, s
