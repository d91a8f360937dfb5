"""What the dashboard shows of the prefix cache: which cached prefixes requests reuse.

`record_hit(node)` runs when an admitted request reuses the cached path root..node: every node
on it counts the hit, and keeps a "recent hits" score that halves every HEAT_HALF_LIFE_S, so a
prefix hit often a minute ago fades while one hit now glows. `tree_view` gives the tree's top
levels as plain dicts (the scheduler sends them to the API process):

    {"tokens": edge length, "subtree_tokens": tokens at or below the node, "hits": ...,
     "recent_hits": ..., "locked": in use by a running request, "text": the edge's first words,
     "children": [...] (the `width` largest), "more": {"nodes": n, "tokens": t} (the rest)}
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

HEAT_HALF_LIFE_S = 60.0


def decayed(heat: tuple[float, float], now: float) -> float:
    value, at = heat
    return value * 0.5 ** ((now - at) / HEAT_HALF_LIFE_S)


def record_hit(node: Any, now: float | None = None) -> None:
    """Counts a reuse of the path from the root to `node` (the root itself is not counted)."""
    now = time.monotonic() if now is None else now
    while node is not None and node.parent is not None:
        node.hits += 1
        node.heat = (decayed(node.heat, now) + 1.0, now)
        node = node.parent


def subtree_sizes(root: Any) -> dict[int, int]:
    """id(node) -> tokens at or below it, for every node (one pass, no recursion)."""
    order, stack = [], [root]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(node.children.values())
    sizes: dict[int, int] = {}
    for node in reversed(order):  # children before parents
        sizes[id(node)] = len(node.key) + sum(sizes[id(c)] for c in node.children.values())
    return sizes


def tree_view(
    root: Any,
    decode: Callable[[list[int]], str],
    depth: int = 4,
    width: int = 8,
    text_tokens: int = 12,
) -> dict[str, Any]:
    """The top `depth` levels below `root`, each node's `width` largest children."""
    now = time.monotonic()
    sizes = subtree_sizes(root)

    def view(node: Any, level: int) -> dict[str, Any]:
        kids = sorted(node.children.values(), key=lambda c: -sizes[id(c)])
        shown, rest = (kids[:width], kids[width:]) if level < depth else ([], kids)
        return {
            "tokens": len(node.key),
            "subtree_tokens": sizes[id(node)],
            "hits": node.hits,
            "recent_hits": round(decayed(node.heat, now), 3),
            "locked": node.lock_ref > 0,
            "text": decode(list(node.key[:text_tokens])) if node.key else "",
            "children": [view(c, level + 1) for c in shown],
            "more": {"nodes": len(rest), "tokens": sum(sizes[id(c)] for c in rest)},
        }

    return view(root, 0)
