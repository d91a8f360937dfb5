"""In which order waiting requests are considered for the next prefill batch.

- fcfs: arrival order (retracted requests go back to the front).
- lpm: longest cached prefix first, so requests whose KV is cached run before it is evicted.
- dfs-weight: the SGLang paper's order. Each waiting request sits at the tree node where its
  cached prefix ends; a node's weight is the number of waiting requests at or below it. A
  depth-first walk enters heavier children first and emits a node's requests after its
  subtree's, so requests of one subtree are admitted together while their shared prefix is
  cached, deepest matches first.

The cache-aware policies need a prefix-sharing cache and match every waiting request; past
`CACHE_AWARE_MAX_WAITING` waiting requests (or with the radix cache off) they fall back to fcfs,
as matching all of them would cost more than it saves.
"""

from __future__ import annotations

from collections import defaultdict

from lmprog.runtime.managers.schedule_batch import Req
from lmprog.runtime.mem_cache.base import BasePrefixCache, MatchResult

POLICIES = ("fcfs", "lpm", "dfs-weight")
CACHE_AWARE_MAX_WAITING = 128


def prioritize(
    waiting: list[Req], policy: str, cache: BasePrefixCache
) -> tuple[list[Req], dict[Req, MatchResult]]:
    """The waiting requests in admission order, and the prefix matches computed on the way."""
    assert policy in POLICIES, policy
    if policy == "fcfs" or not cache.shares_prefixes or len(waiting) > CACHE_AWARE_MAX_WAITING:
        return waiting, {}
    matches = {req: cache.match_prefix(req.match_key) for req in waiting}
    if policy == "lpm":
        # sorted() is stable: equal matches keep arrival order.
        return sorted(waiting, key=lambda r: -matches[r].kv_indices.numel()), matches
    return _dfs_weight_order(waiting, matches), matches


def retraction_order(running: list[Req], chunked: Req | None) -> list[Req]:
    """Who leaves first when decode runs out of KV: a prompt still being chunked (no output
    yet), then the running requests with the fewest generated tokens, the longest prompt first
    among equals (it frees the most). The most advanced requests keep running."""
    order = sorted(running, key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)))
    return ([chunked] if chunked is not None else []) + order


def _dfs_weight_order(waiting: list[Req], matches: dict[Req, MatchResult]) -> list[Req]:
    at_node: dict[object, list[Req]] = defaultdict(list)
    for req in waiting:
        at_node[matches[req].last_node].append(req)
    # Weights only along the paths that lead to some waiting request.
    weight: dict[object, int] = defaultdict(int)
    root = None
    for node, reqs in at_node.items():
        while node is not None:
            weight[node] += len(reqs)
            root, node = node, node.parent
    order: list[Req] = []
    stack: list[tuple[object, bool]] = [(root, False)]
    while stack:
        node, walked = stack.pop()
        if walked:
            order.extend(at_node.get(node, ()))
            continue
        stack.append((node, True))  # its own requests, once its children are done
        children = [c for c in node.children.values() if c in weight]
        # Pushed lightest first, so the heaviest child is walked next (ties: the older child).
        ranked = sorted(enumerate(children), key=lambda ic: (weight[ic[1]], -ic[0]))
        stack.extend((c, False) for _, c in ranked)
    return order
