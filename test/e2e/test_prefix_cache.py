"""RadixAttention end to end on the real model: shared prefixes are computed once, and the
answers and logprobs are those of the same engine with the cache off, under chunked prefill,
retraction in a tiny KV pool, pages and every schedule policy."""

from __future__ import annotations

import math

import pytest

from lmprog import SamplingParams
from lmprog.runtime.managers.io_struct import TokenizedGenerateReqInput
from lmprog.runtime.mem_cache.radix_cache import common_prefix_len

SHARED = "Here are facts about numbers. " + " ".join(
    f"Fact {i}: {i} plus {i} is {2 * i}." for i in range(1, 16)
)
QUESTIONS = [f"{SHARED}\nQuestion: what is {i} plus {i}?\nAnswer:" for i in (3, 7, 11, 20, 31)]
STORIES = [
    f"Write a long story about a {who} who travels to {where}."
    for who, where in [("cat", "Paris"), ("dog", "Rome"), ("robot", "Mars"), ("wizard", "Oslo")]
    + [("pirate", "Lima"), ("farmer", "Cairo"), ("knight", "Delhi"), ("dragon", "Tokyo")]
]
CONVERSATIONS = [
    ["What is the capital of France?", "And of Italy?", "Which of the two is bigger?"],
    ["Name a primary colour.", "Name another one.", "What do they make when mixed?"],
]
TOL = 2e-3  # fp32 logprobs of one continuation computed in different batches and chunks


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=2, **kw)


def assert_same_continuations(expected, got) -> None:
    """Same tokens with the same logprobs (within TOL). Greedy paths may part only at a near
    tie, where the two best tokens of the reference are within TOL of each other."""
    for exp_out, got_out in zip(expected, got, strict=True):
        for e, g in zip(exp_out.outputs, got_out.outputs, strict=True):
            for pos, (te, tg, le, lg) in enumerate(
                zip(e.token_ids, g.token_ids, e.logprobs, g.logprobs)
            ):
                if te != tg:
                    best = sorted((lp.logprob for lp in le.values()), reverse=True)
                    assert best[0] - best[1] < TOL, f"answers part at token {pos} without a tie"
                    break
                assert abs(le[te].logprob - lg[tg].logprob) < TOL, (pos, le[te], lg[tg])
            else:
                assert e.token_ids == g.token_ids


@pytest.fixture(scope="module")
def nocache(engine_factory):
    return engine_factory(seed=0, disable_radix_cache=True)


def test_shared_prefix_is_computed_once(llm, nocache) -> None:
    assert llm.reset_prefix_cache()
    before = llm.scheduler.stats.prefill_tokens, llm.get_cache_stats()
    outs = llm.generate(QUESTIONS, greedy(8), use_tqdm=False)
    prompts = [o.prompt_token_ids for o in outs]
    assert common_prefix_len(prompts[0], prompts[1]) > 150
    # Cold cache: the first computes everything; each other finds its longest prefix shared
    # with an earlier one (the in-batch dedupe ran the first alone, so the rest found the
    # shared prefix cached).
    reuse = [
        max((common_prefix_len(p, q) for q in prompts[:i]), default=0)
        for i, p in enumerate(prompts)
    ]
    assert [o.num_cached_tokens for o in outs] == reuse
    computed = llm.scheduler.stats.prefill_tokens - before[0]
    assert computed == sum(map(len, prompts)) - sum(reuse)
    stats = llm.get_cache_stats()
    assert stats["hit_tokens"] - before[1]["hit_tokens"] == sum(reuse)
    assert_same_continuations(nocache.generate(QUESTIONS, greedy(8), use_tqdm=False), outs)
    assert nocache.get_cache_stats()["hit_tokens"] == 0


def test_multi_turn_chat_reuses_the_history(llm, nocache) -> None:
    histories: list[list[dict]] = [[] for _ in CONVERSATIONS]
    previous: list[list[int] | None] = [None] * len(CONVERSATIONS)
    for turn in range(3):
        for hist, conv in zip(histories, CONVERSATIONS):
            hist.append({"role": "user", "content": conv[turn]})
        outs = llm.chat(histories, greedy(12), use_tqdm=False)
        ref = nocache.chat(histories, greedy(12), use_tqdm=False)
        assert_same_continuations(ref, outs)
        for i, out in enumerate(outs):
            if previous[i] is not None:
                # Everything the last turn computed is a hit, up to where the text differs.
                reuse = common_prefix_len(previous[i], out.prompt_token_ids)
                assert out.num_cached_tokens >= min(reuse, len(out.prompt_token_ids) - 1)
                assert out.num_cached_tokens > 30
            completion = out.outputs[0]
            previous[i] = out.prompt_token_ids + completion.token_ids[:-1]
            histories[i].append({"role": "assistant", "content": completion.text})


def test_retraction_in_a_tiny_pool_keeps_the_answers(llm, engine_factory) -> None:
    """8 requests that together need ~500 KV slots in a pool of 300: admission is optimistic,
    so decode runs out of room and retracts; the retracted resume and every answer is the
    one the default engine gives."""
    tiny = engine_factory(seed=0, max_total_tokens=300, debug_checks=True)
    params = greedy(48, ignore_eos=True)
    retracted = tiny.scheduler.stats.retracted_requests
    outs = tiny.generate(STORIES, params, use_tqdm=False)
    assert tiny.scheduler.stats.retracted_requests > retracted
    assert all(len(o.outputs[0].token_ids) == 48 for o in outs)
    assert_same_continuations(llm.generate(STORIES, params, use_tqdm=False), outs)
    assert tiny.get_kv_stats()["protected"] == 0


def test_retraction_without_the_radix_cache(llm, engine_factory) -> None:
    tiny = engine_factory(seed=0, max_total_tokens=300, disable_radix_cache=True)
    params = greedy(40, ignore_eos=True, n=2)
    outs = tiny.generate(STORIES[:5], params, use_tqdm=False)
    assert tiny.scheduler.stats.retracted_requests > 0
    assert_same_continuations(llm.generate(STORIES[:5], params, use_tqdm=False), outs)
    assert tiny.get_kv_stats()["free"] == 300  # nothing is kept without the cache


def _submit(engine, rid: str, ids: list[int], params: SamplingParams) -> None:
    engine.scheduler.add_request(TokenizedGenerateReqInput(rid, ids, params))


def test_chunked_prefill_interleaves_with_decode(llm, engine_factory) -> None:
    chunky = engine_factory(seed=0, chunked_prefill_size=32, debug_checks=True)
    sched = chunky.scheduler
    tok = chunky.get_tokenizer()
    long_ids = tok.encode(SHARED * 2)
    n_chunks = math.ceil(len(long_ids) / 32)
    _submit(chunky, "short", tok.encode("Count to twenty: one, two,"), greedy(30, ignore_eos=True))
    sched.step()  # the short request's prefill
    _submit(chunky, "long", long_ids, greedy(4))
    trace = []
    while not any(r.rid == "long" for r in sched.running):
        trace.append([r.rid for r in sched.step()])
    # Each chunk but the last gains no token; a decode step of "short" follows each one.
    assert len(trace) == 2 * n_chunks - 1
    assert trace[1::2] == [["short"]] * (n_chunks - 1)
    while sched.has_work():
        sched.step()
    again = llm.generate({"prompt_token_ids": long_ids}, greedy(4), use_tqdm=False)
    solo = chunky.generate({"prompt_token_ids": long_ids}, greedy(4), use_tqdm=False)
    assert_same_continuations(again, solo)


def test_an_aborted_chunked_prompt_leaves_its_chunks_cached(engine_factory) -> None:
    chunky = engine_factory(seed=0, chunked_prefill_size=32, debug_checks=True)
    assert chunky.reset_prefix_cache()
    ids = chunky.get_tokenizer().encode(SHARED + " And more facts.")
    _submit(chunky, "long", ids, greedy(4))
    for _ in range(3):
        chunky.scheduler.step()
    chunky.scheduler.abort_request("long")
    (aborted,) = chunky.scheduler.step()
    assert aborted.finished_reason.kind == "abort"
    out = chunky.generate({"prompt_token_ids": ids[:100] + [13]}, greedy(2), use_tqdm=False)
    assert out[0].num_cached_tokens == 96  # the three chunks that ran


def test_page_size_4_shares_whole_pages(llm, engine_factory) -> None:
    paged = engine_factory(seed=0, page_size=4, max_total_tokens=1024)
    assert paged.reset_prefix_cache()
    outs = paged.generate(QUESTIONS, greedy(6), use_tqdm=False)
    shared = common_prefix_len(outs[0].prompt_token_ids, outs[1].prompt_token_ids)
    assert [o.num_cached_tokens for o in outs[1:]] == [shared // 4 * 4] * (len(outs) - 1)
    assert_same_continuations(llm.generate(QUESTIONS, greedy(6), use_tqdm=False), outs)


@pytest.mark.parametrize("policy", ["lpm", "dfs-weight"])
def test_cache_aware_policies_give_the_same_answers(llm, engine_factory, policy) -> None:
    engine = engine_factory(seed=0, schedule_policy=policy)
    prompts = [QUESTIONS[0], STORIES[0], QUESTIONS[1], STORIES[1], QUESTIONS[2]]
    engine.generate(QUESTIONS[3], greedy(2), use_tqdm=False)  # something to match against
    outs = engine.generate(prompts, greedy(6), use_tqdm=False)
    assert sum(o.num_cached_tokens > 150 for o in outs) == 3
    assert_same_continuations(llm.generate(prompts, greedy(6), use_tqdm=False), outs)


def test_flush_cache_frees_every_slot_and_waits_for_idle(llm) -> None:
    llm.generate(QUESTIONS[:2], greedy(2), use_tqdm=False)
    assert llm.get_kv_stats()["evictable"] > 0
    _submit(llm, "pending", [1, 2, 3], greedy(2))
    assert not llm.reset_prefix_cache()  # refused while a request is in flight
    while llm.scheduler.has_work():
        llm.scheduler.step()
    assert llm.reset_prefix_cache()
    stats = llm.get_kv_stats()
    assert stats["free"] == stats["total"] and stats["evictable"] == 0
