"""The offline API end to end on the real default model."""

from __future__ import annotations

import pytest

from lmprog import SamplingParams

GERMANY = [{"role": "user", "content": "What is the capital of Germany?"}]
ARITH = [{"role": "user", "content": "What is 2+2?"}]
GREEDY = SamplingParams(temperature=0, max_tokens=16)


def test_germany_answers_berlin(llm) -> None:
    out = llm.chat(GERMANY, GREEDY, use_tqdm=False)[0]
    assert "Berlin" in out.outputs[0].text
    assert out.prompt.endswith("assistant\n") and out.finished


def test_prompt_forms_come_back_in_input_order(llm) -> None:
    tok = llm.get_tokenizer()
    texts = ["The capital of France is", "Hello, my name is"]
    ids = [tok.encode(t) for t in texts]
    params = SamplingParams(temperature=0, max_tokens=4)
    by_text = llm.generate(texts, params, use_tqdm=False)
    by_ids = llm.generate(ids, params, use_tqdm=False)
    one_ids = llm.generate(ids[1], params, use_tqdm=False)
    one_dict = llm.generate({"prompt_token_ids": ids[0]}, params, use_tqdm=False)
    assert [o.prompt for o in by_text] == texts
    assert [o.prompt_token_ids for o in by_text] == ids
    assert by_ids[0].prompt is None
    assert [o.outputs[0].token_ids for o in by_ids] == [o.outputs[0].token_ids for o in by_text]
    assert one_ids[0].outputs[0].token_ids == by_text[1].outputs[0].token_ids
    assert one_dict[0].outputs[0].token_ids == by_text[0].outputs[0].token_ids


def test_batched_answers_equal_answers_alone(llm) -> None:
    convs = [GERMANY, ARITH, GERMANY]
    together = [o.outputs[0].text for o in llm.chat(convs, GREEDY, use_tqdm=False)]
    alone = [llm.chat(c, GREEDY, use_tqdm=False)[0].outputs[0].text for c in convs[:2]]
    assert together == [alone[0], alone[1], alone[0]]


def test_max_tokens_ends_with_length(llm) -> None:
    out = llm.generate(
        "Once upon a time",
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        use_tqdm=False,
    )
    c = out[0].outputs[0]
    assert len(c.token_ids) == 5 and c.finish_reason == "length" and c.stop_reason is None
    assert c.text == llm.get_tokenizer().decode(c.token_ids, skip_special_tokens=True)


def test_eos_ends_with_stop_and_is_not_in_the_text(llm) -> None:
    c = llm.chat(GERMANY, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[
        0
    ]
    eos = llm.get_tokenizer().eos_token_id
    assert c.finish_reason == "stop" and c.token_ids[-1] == eos and c.stop_reason is None
    assert "<|im_end|>" not in c.text


def test_stop_string_across_tokens_is_trimmed(llm) -> None:
    tok = llm.get_tokenizer()
    base = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate("The history of Rome", base, use_tqdm=False)[0].outputs[0]
    # A stop string straddling the boundary between output tokens 5 and 6.
    cut = len(tok.decode(full.token_ids[:6]))
    stop = full.text[cut - 2 : cut + 2]
    expected = full.text[: full.text.find(stop)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    c = llm.generate("The history of Rome", params, use_tqdm=False)[0].outputs[0]
    assert (c.text, c.finish_reason, c.stop_reason) == (expected, "stop", stop)
    kept = SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
    )
    c2 = llm.generate("The history of Rome", kept, use_tqdm=False)[0].outputs[0]
    assert c2.text == expected + stop


def test_stop_token_ids(llm) -> None:
    base = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = llm.generate("The history of Rome", base, use_tqdm=False)[0].outputs[0]
    stop_id = full.token_ids[3]
    first = full.token_ids.index(stop_id)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id])
    c = llm.generate("The history of Rome", params, use_tqdm=False)[0].outputs[0]
    assert c.token_ids == full.token_ids[: first + 1]
    assert (c.finish_reason, c.stop_reason) == ("stop", stop_id)


def test_min_tokens_holds_back_eos(llm) -> None:
    params = SamplingParams(temperature=0, max_tokens=40, min_tokens=30)
    c = llm.chat(GERMANY, params, use_tqdm=False)[0].outputs[0]
    eos = llm.get_tokenizer().eos_token_id
    assert len(c.token_ids) >= 30 and eos not in c.token_ids[:30]


def test_logit_bias_bans_and_forces_tokens(llm) -> None:
    prompt = "The capital of France is"
    base = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    plain = llm.generate(prompt, base, use_tqdm=False)[0].outputs[0].token_ids
    banned = base.with_overrides(logit_bias={plain[0]: -100})
    forced_id = llm.get_tokenizer().encode(" banana")[0]
    forced = {str(forced_id): 100}  # string keys, as JSON clients send them
    sampled = SamplingParams(temperature=1.0, max_tokens=6, seed=3, logit_bias=forced)
    outs = llm.generate(
        [prompt] * 4,
        [banned, base.with_overrides(logit_bias=forced), sampled, base],
        use_tqdm=False,
    )
    without_first = outs[0].outputs[0].token_ids
    assert without_first[0] != plain[0] and plain[0] not in without_first
    assert outs[1].outputs[0].token_ids == [forced_id] * 6
    assert outs[2].outputs[0].token_ids == [forced_id] * 6
    assert outs[3].outputs[0].token_ids == plain  # the row without a bias is untouched


def test_seeded_sampling_is_reproducible(llm) -> None:
    def run(seed: int) -> list[int]:
        p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=seed, ignore_eos=True)
        return llm.generate("Tell me a story:", p, use_tqdm=False)[0].outputs[0].token_ids

    assert run(123) == run(123)
    assert run(123) != run(124)


def test_n_continuations_share_one_prefill(llm) -> None:
    tok = llm.get_tokenizer()
    prompt = "Write a sentence about the sea:"
    n_prompt = len(tok.encode(prompt))
    stats = llm.scheduler.stats
    before = stats.prefill_tokens
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    assert stats.prefill_tokens - before == n_prompt  # computed once, not 3 times
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    # the first continuation is what n=1 with the same seed gives
    single = SamplingParams(temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    assert (
        llm.generate(prompt, single, use_tqdm=False)[0].outputs[0].token_ids
        == out.outputs[0].token_ids
    )
    greedy = llm.generate(prompt, SamplingParams(n=2, temperature=0, max_tokens=8), use_tqdm=False)[
        0
    ]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_logprobs(llm) -> None:
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)
    c = llm.generate("The capital of France is", params, use_tqdm=False)[0].outputs[0]
    assert len(c.logprobs) == 6
    total = 0.0
    for token, entry in zip(c.token_ids, c.logprobs):
        assert token in entry and len(entry) == 3  # greedy: the chosen token is the top-1
        assert entry[token].rank == 1
        assert all(lp.logprob <= 0 for lp in entry.values())
        total += entry[token].logprob
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)
    plain = llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0]
    assert plain.logprobs is None and plain.cumulative_logprob is None


def test_metrics_are_ordered(llm) -> None:
    out = llm.generate("Hello", SamplingParams(max_tokens=3), use_tqdm=False)[0]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time
    assert m.first_token_time <= m.last_token_time <= m.finished_time
    assert m.time_in_queue >= 0 and out.num_cached_tokens == 0


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda tok: ("", SamplingParams()), "empty"),
        (
            lambda tok: ([5, 49152], SamplingParams()),
            "49152 at position 1 is outside the vocabulary",
        ),
        (
            lambda tok: ([1] * 9000, SamplingParams()),
            "prompt has 9000 tokens; the model's context is 8192",
        ),
        (lambda tok: ("hi", SamplingParams(stop_token_ids=[10**6])), "stop_token_ids"),
        (lambda tok: ("hi", SamplingParams(logprobs=100)), "logprobs"),
        (
            lambda tok: ("hi", SamplingParams(n=257)),
            r"n must be <= 256 \(the server's max_running_requests",
        ),
        (
            lambda tok: ("hi", SamplingParams(logit_bias={"99999": -100})),
            r"logit_bias has token id 99999, outside the vocabulary \(ids must be < 49152\)",
        ),
    ],
)
def test_bad_input_raises_and_the_engine_keeps_working(llm, make_input, message) -> None:
    prompt, params = make_input(llm.get_tokenizer())
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, params, use_tqdm=False)
    assert not llm.scheduler.has_work()
    assert llm.chat(GERMANY, GREEDY, use_tqdm=False)[0].outputs[0].text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"n": 0}, "n"),
    ],
)
def test_bad_sampling_params_name_field_and_value(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_per_prompt(llm) -> None:
    outs = llm.generate(
        ["A", "B"],
        [
            SamplingParams(max_tokens=2, ignore_eos=True),
            SamplingParams(max_tokens=5, ignore_eos=True),
        ],
        use_tqdm=False,
    )
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 5]
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(["A", "B"], [SamplingParams()] * 3, use_tqdm=False)


SMALL = {"seed": 0, "page_size": 4, "max_total_tokens": 256, "max_running_requests": 4}
SMALL["max_model_len"] = 128


def test_paged_kv_and_a_small_pool_give_the_same_answers(llm, engine_factory) -> None:
    """page_size 4 and a pool too small for all requests at once: requests queue, pages fill
    and free, and the greedy answers are those of the default engine."""
    small = engine_factory(**SMALL)
    convs = [GERMANY, ARITH] * 4
    expected = [o.outputs[0].text for o in llm.chat(convs, GREEDY, use_tqdm=False)]
    got = [o.outputs[0].text for o in small.chat(convs, GREEDY, use_tqdm=False)]
    assert got == expected
    p = SamplingParams(n=3, temperature=0, max_tokens=6)
    outs = small.generate("Count: one, two,", p, use_tqdm=False)[0].outputs
    assert outs[0].token_ids == outs[1].token_ids == outs[2].token_ids
    with pytest.raises(ValueError, match="KV pool holds 256"):
        small.generate("hi", SamplingParams(max_tokens=100, n=3), use_tqdm=False)


def test_max_tokens_beyond_the_context_stops_at_it_offline(engine_factory) -> None:
    """vLLM's offline behaviour (the HTTP routes refuse instead): the sequence ends at the
    context with finish_reason length."""
    small = engine_factory(**SMALL)
    prompt = [42] * 124
    out = small.generate(prompt, SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4 and out[0].outputs[0].finish_reason == "length"


def test_a_failed_batch_step_fails_its_requests_and_the_engine_goes_on(llm, monkeypatch) -> None:
    """A fault in the batched work (here the forward) ends that step's sequences with an
    error; their half-written KV is freed, not cached, and later requests run normally."""
    runner = llm.scheduler.model_runner
    real_forward = runner.forward
    calls = {"n": 0}

    def failing_once(batch):
        calls["n"] += 1
        if calls["n"] == 2:  # the first decode step
            raise RuntimeError("simulated kernel failure")
        return real_forward(batch)

    monkeypatch.setattr(runner, "forward", failing_once)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, n=2)
    outs = llm.generate(["Count to ten:", "Name a color:"], params, use_tqdm=False)
    for out in outs:
        assert out.error is not None and "simulated kernel failure" in out.error
        assert {c.finish_reason for c in out.outputs} == {"error"}
    llm.check_integrity()
    monkeypatch.setattr(runner, "forward", real_forward)
    assert "Berlin" in llm.chat(GERMANY, GREEDY, use_tqdm=False)[0].outputs[0].text
