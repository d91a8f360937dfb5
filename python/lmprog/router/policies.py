"""Routing policies: which healthy worker gets a request.

A policy is given the healthy workers (never empty; each with the router's in-flight count as
`load`) and the request's routing text (request_text.py), and returns one of them. Chosen by name
with `make_policy`:

- round_robin: each worker in turn.
- shortest_queue: the fewest requests in flight (ties: in turn).
- cache_aware: the worker whose recent text shares the longest prefix with this request, so a
  conversation's turns and a few-shot prefix's questions meet the KV their worker has cached.
  Two escapes keep it from piling everything on one worker:
    * the load is imbalanced — max load - min load > balance_abs_threshold AND
      max load > balance_rel_threshold * min load — then the shortest queue wins;
    * the best match covers less than cache_threshold of the text and extends no earlier request
      whole — then this is new text (at most a shared system prompt or template in common), and
      it goes to the worker whose tree is smallest (the one with the most room), fewest in flight
      among equals.
  The chosen worker's tree then takes the text. SGLang's router decides the same way, except for
  the "extends an earlier request" rule: a chat's next turn adds the reply and a new message to
  the text, which can be more than it had, so its match fraction alone may fall below the
  threshold although that worker holds the whole conversation so far.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from lmprog.router.prefix_tree import PrefixTree
from lmprog.router.workers import Worker


class RoutingPolicy(ABC):
    name: str

    @abstractmethod
    def select(self, workers: Sequence[Worker], text: str) -> Worker:
        """One of `workers` (non-empty) for a request whose routing text is `text`."""

    def forget(self, url: str) -> None:
        """The worker left the routing set: drop any state about its cache."""


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def select(self, workers: Sequence[Worker], text: str) -> Worker:
        assert workers, "select needs at least one worker"
        return workers[next(self._turn) % len(workers)]


class ShortestQueue(RoutingPolicy):
    name = "shortest_queue"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def select(self, workers: Sequence[Worker], text: str) -> Worker:
        assert workers, "select needs at least one worker"
        least = min(w.load for w in workers)
        tied = [w for w in workers if w.load == least]
        return tied[next(self._turn) % len(tied)]


@dataclass(frozen=True)
class CacheAwareConfig:
    cache_threshold: float = 0.5
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.5
    max_tree_chars: int = 1 << 22  # per worker; about 4 M characters

    def __post_init__(self) -> None:
        checks = [
            ("cache_threshold", 0 <= self.cache_threshold <= 1, "in [0, 1]"),
            ("balance_abs_threshold", self.balance_abs_threshold >= 0, ">= 0"),
            ("balance_rel_threshold", self.balance_rel_threshold >= 1, ">= 1"),
            ("max_tree_chars", self.max_tree_chars >= 1, ">= 1"),
        ]
        for name, ok, limit in checks:
            if not ok:
                raise ValueError(f"{name} must be {limit}, got {getattr(self, name)!r}")


class CacheAware(RoutingPolicy):
    name = "cache_aware"

    def __init__(self, config: CacheAwareConfig | None = None) -> None:
        self.config = config or CacheAwareConfig()
        self.trees: dict[str, PrefixTree] = {}
        self._shortest = ShortestQueue()

    def select(self, workers: Sequence[Worker], text: str) -> Worker:
        assert workers, "select needs at least one worker"
        if self.imbalanced(workers):
            choice = self._shortest.select(workers, text)
        else:
            matched = {w.url: self._tree(w.url).match(text) for w in workers}
            best = max(workers, key=lambda w: (matched[w.url].chars, -w.load))
            found = matched[best.url]
            if text and (found.chars >= self.config.cache_threshold * len(text) or found.whole):
                choice = best
            else:
                choice = min(workers, key=lambda w: (self._tree(w.url).size, w.load))
        self._tree(choice.url).insert(text)
        return choice

    def imbalanced(self, workers: Sequence[Worker]) -> bool:
        most, least = max(w.load for w in workers), min(w.load for w in workers)
        cfg = self.config
        return most - least > cfg.balance_abs_threshold and most > cfg.balance_rel_threshold * least

    def forget(self, url: str) -> None:
        self.trees.pop(url, None)

    def _tree(self, url: str) -> PrefixTree:
        if url not in self.trees:
            self.trees[url] = PrefixTree(self.config.max_tree_chars)
        return self.trees[url]


POLICY_NAMES = ("round_robin", "shortest_queue", "cache_aware")


def make_policy(name: str, cache_aware: CacheAwareConfig | None = None) -> RoutingPolicy:
    if name == "round_robin":
        return RoundRobin()
    if name == "shortest_queue":
        return ShortestQueue()
    if name == "cache_aware":
        return CacheAware(cache_aware)
    raise ValueError(f"unknown routing policy {name!r}; supported: {', '.join(POLICY_NAMES)}")
