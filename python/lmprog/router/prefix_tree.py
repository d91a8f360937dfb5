"""PrefixTree: an approximate radix tree of the text one worker has recently been sent.

The cache-aware policy keeps one per worker and asks each how much of a new request's text it has
seen. It is approximate in two ways, both on purpose: it holds characters of request text, not the
worker's tokens (no tokenizer in the router), and it does not know what the worker's own radix cache
evicted; it evicts on its own, least recently matched leaves first, once it holds more than
`max_chars` characters. A match it reports is therefore a guess that the worker still has that
prefix's KV, which is all routing needs.

Edges hold strings; a node's children are keyed by the first character of their edge:

    root ─ "Hello, " ─┬─ "world"        insert("Hello, there") splits no edge;
                      └─ "there"        insert("Help") would split "Hello, " into "Hel" + "lo, "

Invariant (`check_integrity`): `size` is the sum of the edge lengths, and no child edge is empty.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(eq=False)
class _Node:
    key: str
    parent: _Node | None
    last_used: int
    children: dict[str, _Node] = field(default_factory=dict)
    ends_text: bool = False  # an inserted text ended here


class Match(NamedTuple):
    """`chars`: how many leading characters of the text the tree holds. `whole`: the length of
    the longest text inserted earlier (and not evicted) that is a prefix of this one, 0 if none:
    a request that extends an earlier one (a conversation's next turn) has `whole` > 0."""

    chars: int
    whole: int


def _common_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixTree:
    def __init__(self, max_chars: int) -> None:
        assert max_chars >= 1, f"max_chars must be >= 1, got {max_chars}"
        self.max_chars = max_chars
        self.root = _Node("", None, 0)
        self.size = 0  # characters stored, summed over the edges
        self._clock = itertools.count(1)

    def match(self, text: str) -> Match:
        """How much of `text` the tree holds (see Match); marks that path recently used."""
        now = next(self._clock)
        node, i, whole = self.root, 0, 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                break
            n = _common_len(child.key, text[i:])
            child.last_used = now
            i += n
            if n < len(child.key):
                break
            node = child
            if node.ends_text:
                whole = i
        return Match(i, whole)

    def insert(self, text: str) -> None:
        """Adds `text` (sharing what is already there), then evicts down to `max_chars`."""
        now = next(self._clock)
        node, i = self.root, 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                child = node.children[text[i]] = _Node(text[i:], node, now)
                self.size += len(text) - i
                node = child
                break
            n = _common_len(child.key, text[i:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_used = now
            node, i = child, i + n
        if node is not self.root:
            node.ends_text = True
        self.evict(self.max_chars)

    def evict(self, max_chars: int) -> None:
        """Removes least recently used leaves until at most `max_chars` characters remain."""
        if self.size <= max_chars:
            return
        leaves = [(n.last_used, id(n), n) for n in self._nodes() if not n.children]
        heapq.heapify(leaves)
        while self.size > max_chars and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            self.size -= len(leaf.key)
            if parent is not self.root and not parent.children:
                heapq.heappush(leaves, (parent.last_used, id(parent), parent))

    def check_integrity(self) -> None:
        total = 0
        for node in self._nodes():
            total += len(node.key)
            for first, child in node.children.items():
                assert child.key and child.key[0] == first, (
                    f"bad edge {child.key!r} under {first!r}"
                )
                assert child.parent is node, f"edge {child.key!r} has the wrong parent"
        assert total == self.size, f"size is {self.size}, the edges hold {total} characters"

    def _split(self, child: _Node, n: int) -> _Node:
        """Cuts `child`'s edge after `n` characters; returns the new upper node."""
        parent = child.parent
        upper = _Node(child.key[:n], parent, child.last_used)  # no text ended at the cut
        parent.children[upper.key[0]] = upper
        child.key, child.parent = child.key[n:], upper
        upper.children[child.key[0]] = child
        return upper

    def _nodes(self) -> list[_Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out
