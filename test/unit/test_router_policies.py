"""The router's policies and its prefix tree, on plain Worker objects (no servers)."""

from __future__ import annotations

import random

import pytest

from lmprog.router.policies import CacheAware, CacheAwareConfig, make_policy
from lmprog.router.prefix_tree import PrefixTree
from lmprog.router.request_text import routing_text
from lmprog.router.workers import Worker


def workers(*loads: int) -> list[Worker]:
    return [Worker(f"http://w{i}", healthy=True, load=load) for i, load in enumerate(loads)]


# ---- prefix tree ------------------------------------------------------------------------------
def test_tree_matches_longest_stored_prefix_across_split_edges() -> None:
    tree = PrefixTree(max_chars=1000)
    tree.insert("Hello, world")
    tree.insert("Help me")  # splits "Hello, world" after "Hel"
    tree.check_integrity()
    assert tree.size == len("Hello, world") + len("p me")
    assert tree.match("Hello, there") == (len("Hello, "), 0)
    assert tree.match("Help me please") == (len("Help me"), len("Help me"))
    assert tree.match("Hel") == (3, 0)
    assert tree.match("xyz") == (0, 0)
    assert tree.match("") == (0, 0)
    tree.insert("Hello")  # ends inside the edge "lo, world": the edge is cut there
    tree.check_integrity()
    assert tree.match("Hello, world!") == (len("Hello, world"), len("Hello, world"))
    assert tree.match("Hello!") == (len("Hello"), len("Hello"))


def test_tree_evicts_least_recently_used_leaves_first() -> None:
    tree = PrefixTree(max_chars=30)
    tree.insert("system: A\nuser: one")  # 19 characters
    tree.insert("system: A\nuser: two")  # shares "system: A\nuser: ", adds 3
    tree.match("system: A\nuser: one")  # "one" is now more recent than "two"
    tree.insert("system: B\nuser: three")  # over 30: "two" goes first, then what is needed
    tree.check_integrity()
    assert tree.size <= 30
    assert tree.match("system: B\nuser: three").chars == len("system: B\nuser: three")
    assert tree.match("system: A\nuser: two").chars < len("system: A\nuser: two")


def test_tree_integrity_under_random_inserts_and_evictions() -> None:
    rng = random.Random(0)
    tree = PrefixTree(max_chars=200)
    texts = ["".join(rng.choice("ab ") for _ in range(rng.randint(1, 40))) for _ in range(300)]
    for text in texts:
        tree.insert(text)
        tree.check_integrity()
        assert tree.size <= 200
        assert tree.match(text) == (len(text), len(text))  # the newest text is never evicted


# ---- policies ---------------------------------------------------------------------------------
def test_round_robin_takes_each_worker_in_turn() -> None:
    policy, ws = make_policy("round_robin"), workers(0, 0, 0)
    assert [policy.select(ws, "x").url for _ in range(6)] == [w.url for w in ws] * 2


def test_shortest_queue_picks_least_in_flight() -> None:
    policy, ws = make_policy("shortest_queue"), workers(3, 1, 2)
    assert policy.select(ws, "x") is ws[1]


def test_cache_aware_keeps_a_conversation_on_one_worker() -> None:
    policy, ws = CacheAware(), workers(0, 0)
    first = {policy.select(ws, text).url for text in ("user: hi, I am Ann\n", "user: Bob here\n")}
    assert len(first) == 2  # new text goes to the emptier worker: the two spread out
    turn1 = "user: tell me about volcanoes please\n"
    owner = policy.select(ws, turn1)
    turn2 = turn1 + "assistant: they erupt\nuser: why?\n"
    turn3 = turn2 + "assistant: pressure\nuser: and then?\n"
    assert policy.select(ws, turn2) is owner
    assert policy.select(ws, turn3) is owner


def test_cache_aware_ignores_a_match_below_the_cache_threshold() -> None:
    policy = CacheAware(CacheAwareConfig(cache_threshold=0.5))
    ws = workers(0, 0)
    policy.trees[ws[0].url] = PrefixTree(1000)
    policy.trees[ws[0].url].insert("shared system prompt. " + "x" * 50)  # w0 holds more text
    text = "shared system prompt. " + "a brand new question that is much longer" * 2
    assert policy.trees[ws[0].url].match(text).chars < 0.5 * len(text)
    assert policy.select(ws, text) is ws[1]  # below threshold: the smaller tree wins


def test_cache_aware_follows_a_turn_that_adds_more_than_it_had() -> None:
    policy, ws = CacheAware(CacheAwareConfig(cache_threshold=0.5)), workers(0, 0)
    turn1 = "user: a tip for playing the piano, please?\n"
    owner = policy.select(ws, turn1)
    other = policy.select(ws, "system: hi\n")  # new text: to the empty worker
    assert other is not owner
    turn2 = (
        turn1 + "assistant: practise slowly every day, hands apart, then together\nuser: more?\n"
    )
    assert len(turn1) < 0.5 * len(turn2)  # below the threshold, yet it extends turn 1 whole
    assert policy.select(ws, turn2) is owner  # not the worker with the smaller tree


def test_cache_aware_falls_back_to_shortest_queue_when_imbalanced() -> None:
    policy = CacheAware(CacheAwareConfig(balance_abs_threshold=4, balance_rel_threshold=1.5))
    ws = workers(0, 0)
    text = "user: a long conversation that w0 has cached\n"
    assert policy.select(ws, text) is ws[0]
    ws[0].load, ws[1].load = 5, 1  # 5 - 1 is not > 4: the cache decides
    assert policy.select(ws, text + "more") is ws[0]
    ws[0].load, ws[1].load = 6, 1  # 6 - 1 > 4 and 6 > 1.5 * 1: imbalanced
    assert policy.select(ws, text + "again") is ws[1]


def test_cache_aware_forgets_a_worker_that_left() -> None:
    policy, ws = CacheAware(), workers(0, 0)
    text = "user: remember me\n"
    owner = policy.select(ws, text)
    policy.forget(owner.url)
    assert owner.url not in policy.trees


def test_unknown_policy_and_bad_thresholds_name_the_value() -> None:
    with pytest.raises(ValueError, match="unknown routing policy 'random'.*round_robin"):
        make_policy("random")
    with pytest.raises(ValueError, match="cache_threshold must be in \\[0, 1\\], got 2"):
        CacheAwareConfig(cache_threshold=2)


# ---- routing text -----------------------------------------------------------------------------
def test_chat_routing_text_of_turn_k_is_a_prefix_of_turn_k_plus_1() -> None:
    turn1 = [{"role": "user", "content": "hi"}]
    turn2 = [
        *turn1,
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "more"}]},
    ]
    text1 = routing_text("/v1/chat/completions", {"messages": turn1})
    text2 = routing_text("/v1/chat/completions", {"messages": turn2})
    assert text1 == "user: hi\n"
    assert text2 == "user: hi\nassistant: hello\nuser: more\n"


def test_routing_text_of_native_and_completion_bodies() -> None:
    assert routing_text("/generate", {"text": "abc"}) == "abc"
    assert routing_text("/generate", {"input_ids": [1, 2, 3]}) == "1 2 3"
    assert routing_text("/generate", {"text": ["first", "second"]}) == "first"
    assert routing_text("/v1/completions", {"prompt": "p"}) == "p"
    assert routing_text("/v1/embeddings", {"input": ["e"]}) == "e"
    assert routing_text("/generate", ["not", "an", "object"]) == ""
