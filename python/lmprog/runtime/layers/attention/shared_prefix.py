"""Shared-prefix groups of a decode batch, for cascade attention (`CpuAttnBackend`).

Requests whose prompts share a prefix through the radix cache hold the same KV slots for it, so
their rows of req_to_token start with the same slot indices:

    row of request 0:   s0 s1 s2 ... s1012 | a0 a1 ...    \\  group 0, prefix 1013
    row of request 1:   s0 s1 s2 ... s1012 | b0 b1 ...    /
    row of request 2:   t0 t1 t2 ...                         no group (-1)

Requests are grouped by their first slot; a group's prefix length is where any member's row first
differs from its first member's, capped at min(seq_len) - 1 of its members (NOTE: the -1 keeps
each member's newest token its own, as the kernel requires P < seq_len).

The first difference is found by binary search, which relies on the pool's invariant: two live
rows that hold the same slot at position p hold the same slots at every position before it. (A
slot shared by two requests comes from a radix-tree path, which they then share from the root;
the KV in a slot is only valid after the exact tokens before it anyway.) So a step costs about
20 small torch ops plus 8 per halving (10 halvings for a 1k-token prefix, 15 for 32k): measured
0.3-0.5 ms on 2 cores for 64 or 256 requests behind 1k or 30k shared tokens, where comparing
members x prefix slots took 0.25 ms to 70 ms. A batch of one request stops at once, and one whose
first slots are all distinct after a gather and a `unique` (~15 us).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SharedPrefixes:
    """The cascade kernel's grouping of one decode step."""

    group_of: torch.Tensor  # [B] int64: the group of each request, or -1
    prefix_lens: torch.Tensor  # [G] int64: tokens every member of the group shares


def find_shared_prefixes(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    min_prefix: int,
) -> SharedPrefixes | None:
    """Groups of >= 2 requests sharing at least `min_prefix` leading slots, or None if none."""
    if req_pool_indices.numel() < 2:
        return None
    first = req_to_token[req_pool_indices, 0]
    _, group, counts = torch.unique(first, return_inverse=True, return_counts=True)
    if int(counts.max()) < 2:
        return None
    big, dev = torch.iinfo(torch.int64).max, first.device

    def group_min(values: torch.Tensor, of: torch.Tensor) -> torch.Tensor:
        """Per group (of `counts`), the min of `values` over its members `of`."""
        init = torch.full(counts.shape, big, dtype=torch.int64, device=dev)
        return init.scatter_reduce_(0, of, values, "amin")

    cap = group_min(seq_lens - 1, group)
    candidate = (counts >= 2) & (cap >= min_prefix)
    members = candidate[group].nonzero().squeeze(1)  # batch indices, in batch order
    if members.numel() == 0:
        return None
    group, cap = group[members], cap[group[members]]
    leader = group_min(members, group)[group]
    # Flat offsets of each member's row and its leader's row, [2, M].
    rows = torch.stack([req_pool_indices[members], req_pool_indices[leader]])
    rows = rows * req_to_token.shape[1]  # take() indexes the tensor as if flattened
    # The first difference of each member from its leader lies in [lo, hi]: slots agree before
    # it and differ at it, or it is the cap. NOTE: once lo == hi, a member capped short of its
    # first difference sees equal slots at mid == hi and moves lo past hi; hi stays the answer.
    lo, hi = torch.zeros_like(cap), cap
    for _ in range(int(cap.max()).bit_length()):
        mid = (lo + hi) >> 1
        slots = torch.take(req_to_token, rows + mid)
        same = slots[0] == slots[1]
        lo = torch.where(same, mid + 1, lo)
        hi = torch.where(same, hi, mid)
    prefix = group_min(hi, group)
    keep = candidate & (prefix >= min_prefix)
    if not bool(keep.any()):
        return None
    renumber = torch.cumsum(keep, 0) - 1
    group_of = torch.full(first.shape, -1, dtype=torch.int64, device=dev)
    group_of[members] = torch.where(keep[group], renumber[group], -1)
    return SharedPrefixes(group_of, prefix[keep])
