"""The streaming engine (AsyncLLM) end to end on the real default model.

One engine serves the module, read by concurrent generators; after every test nothing is live
and its KV accounting balances (free + evictable + protected == total, no locks, no slots held).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import subprocess
import sys
import weakref
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from lmprog import AsyncEngineArgs, AsyncLLM, RequestOutput, RequestOutputKind, SamplingParams
from lmprog.runtime.engine.exceptions import EngineDeadError, EngineGenerateError
from lmprog.runtime.managers.scheduler import FAULT_ENV

ROOT = Path(__file__).resolve().parents[2]
GERMANY = [{"role": "user", "content": "What is the capital of Germany?"}]
ARITH = [{"role": "user", "content": "What is 2+2?"}]
FAULTY = "faulty-request"
# Long enough that a request is still running whenever a test stops it.
LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
def engine() -> AsyncLLM:
    # The configuration of conftest's `llm` (seed 0, float32), which some tests compare with.
    # Requests whose id contains FAULTY fail inside the engine's step (a test hook).
    os.environ[FAULT_ENV] = FAULTY
    try:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(seed=0, dtype="float32"))
    finally:
        del os.environ[FAULT_ENV]
    yield engine
    engine.shutdown()


@pytest.fixture(autouse=True)
def _engine_balanced(engine: AsyncLLM) -> None:
    yield

    async def check() -> None:
        await _until_idle(engine)
        stats = await engine.get_kv_stats()
        assert stats["running_requests"] == stats["waiting_requests"] == 0, stats
        await engine.check_integrity()

    run(check())


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Runs a test body in a fresh event loop; a stream that hangs fails the test."""
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


async def _until_idle(engine: AsyncLLM) -> None:
    """Until no request is live: an abort sent by a closing generator lands a step later."""
    async with asyncio.timeout(30):
        while engine.has_unfinished_requests():
            await asyncio.sleep(0.01)


async def collect(
    engine: AsyncLLM, prompt: Any, params: SamplingParams | None, request_id: str
) -> list[RequestOutput]:
    return [out async for out in engine.generate(prompt, params, request_id)]


def chat_ids(tokenizer: Any, conversation: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def test_concurrent_generators_stream_and_are_batched(engine: AsyncLLM) -> None:
    prompts = [
        "Hello, my name is",
        "The capital of France is",
        "Once upon a time",
        "The future of AI is",
    ]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def body() -> tuple[list[list[RequestOutput]], dict[str, float]]:
        before = await engine.get_scheduler_stats()
        results = await asyncio.gather(
            *(collect(engine, p, params, f"batch-{i}") for i, p in enumerate(prompts))
        )
        after = await engine.get_scheduler_stats()
        return results, {k: after[k] - before[k] for k in after}

    results, stats = run(body())
    for i, outs in enumerate(results):
        assert {o.request_id for o in outs} == {f"batch-{i}"}
        assert len(outs) > 1, "one output for the whole request: nothing was streamed"
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        for a, b in itertools.pairwise(outs):  # cumulative: each extends the one before
            assert b.outputs[0].token_ids[: len(a.outputs[0].token_ids)] == a.outputs[0].token_ids
            assert b.outputs[0].text.startswith(a.outputs[0].text)
        final = outs[-1].outputs[0]
        assert len(final.token_ids) == 12 and final.finish_reason == "length"
    assert stats["generated_tokens"] == 4 * 12
    # One request at a time would take 4 x 11 decode steps; batched, they decode together.
    assert stats["decode_steps"] <= 2 * 12, stats


def test_greedy_outputs_equal_llm_generate(engine: AsyncLLM, llm) -> None:
    tokenizer = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": chat_ids(tokenizer, c)} for c in (GERMANY, ARITH)]
    params = SamplingParams(temperature=0, max_tokens=16)
    expected = llm.generate(prompts, params, use_tqdm=False)

    async def body() -> list[list[RequestOutput]]:
        return await asyncio.gather(
            *(collect(engine, p, params, f"same-{i}") for i, p in enumerate(prompts))
        )

    got = [outs[-1] for outs in run(body())]
    assert "Berlin" in got[0].outputs[0].text
    for mine, theirs in zip(got, expected):
        assert mine.prompt_token_ids == theirs.prompt_token_ids
        a, b = mine.outputs[0], theirs.outputs[0]
        assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == (
            b.token_ids,
            b.text,
            b.finish_reason,
            b.stop_reason,
        )


def test_delta_and_final_only_agree_with_cumulative(engine: AsyncLLM) -> None:
    """Two seeded sampled sequences (n=2) with logprobs, read three ways at once."""
    base = {"n": 2, "temperature": 0.8, "seed": 7, "max_tokens": 10, "ignore_eos": True}
    base |= {"logprobs": 2, "prompt_logprobs": 1}
    prompt = "The history of Rome"

    async def body() -> list[list[RequestOutput]]:
        return await asyncio.gather(
            *(
                collect(engine, prompt, SamplingParams(**base, output_kind=kind), f"kind-{kind}")
                for kind in RequestOutputKind
            )
        )

    cumulative, deltas, final_only = run(body())
    final = cumulative[-1]
    assert final.finished and [c.index for c in final.outputs] == [0, 1]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in final.outputs)
    assert all(o.prompt_logprobs is not None for o in cumulative)

    assert [o.finished for o in deltas] == [False] * (len(deltas) - 1) + [True]
    assert deltas[0].prompt_logprobs == final.prompt_logprobs
    assert all(o.prompt_logprobs is None for o in deltas[1:])
    for index, whole in enumerate(final.outputs):
        pieces = [c for o in deltas for c in o.outputs if c.index == index]
        assert all(c.token_ids or c.finish_reason for c in pieces), "an empty delta"
        assert [c.finish_reason for c in pieces] == [None] * (len(pieces) - 1) + ["length"]
        assert [t for c in pieces for t in c.token_ids] == whole.token_ids
        assert "".join(c.text for c in pieces) == whole.text
        assert [lp for c in pieces for lp in c.logprobs] == whole.logprobs
        assert pieces[-1].cumulative_logprob == pytest.approx(whole.cumulative_logprob)

    assert len(final_only) == 1 and final_only[0].finished
    assert final_only[0].outputs == final.outputs


def test_abort_mid_stream_ends_the_request_and_frees_its_kv(engine: AsyncLLM) -> None:
    bystander_params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    async def body() -> tuple[list[RequestOutput], list[RequestOutput], dict[str, int]]:
        bystander = asyncio.create_task(
            collect(engine, "The capital of France is", bystander_params, "bystander")
        )
        outs = []
        async for out in engine.generate("Once upon a time", LONG, "victim"):
            outs.append(out)
            if len(outs) == 3:
                await engine.abort("victim")
        others = await bystander
        await _until_idle(engine)
        return outs, others, await engine.get_kv_stats()

    outs, others, kv = run(body())
    final = outs[-1]
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert all(not o.finished for o in outs[:-1])
    assert len(final.outputs[0].token_ids) < 200
    assert others[-1].outputs[0].finish_reason == "length"
    assert len(others[-1].outputs[0].token_ids) == 24
    assert kv["held_by_requests"] == kv["protected"] == kv["locked_nodes"] == 0, kv
    assert kv["free"] + kv["evictable"] + kv["protected"] == kv["total"], kv


def test_leaving_the_loop_aborts_the_request(engine: AsyncLLM) -> None:
    """A reader that breaks out, or whose task is cancelled, stops its request."""

    async def body() -> float:
        before = await engine.get_scheduler_stats()
        async for _ in engine.generate("Once upon a time", LONG, "leaver"):
            break
        await _until_idle(engine)

        started = asyncio.Event()

        async def reader() -> None:
            async for _ in engine.generate("Once upon a time", LONG, "cancelled"):
                started.set()

        task = asyncio.create_task(reader())
        await started.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await _until_idle(engine)
        after = await engine.get_scheduler_stats()
        return after["generated_tokens"] - before["generated_tokens"]

    generated = run(body())
    assert 2 <= generated < 200, f"{generated} tokens: the requests were not stopped"


def test_a_live_request_id_is_refused(engine: AsyncLLM) -> None:
    short = SamplingParams(temperature=0, max_tokens=2)

    async def body() -> tuple[list[RequestOutput], list[RequestOutput]]:
        first = engine.generate("Once upon a time", LONG, "dup")
        outs = [await anext(first)]  # live from here on
        with pytest.raises(ValueError, match="request id 'dup' is already in flight"):
            await anext(engine.generate("Hello", short, "dup"))
        await engine.abort("dup")
        outs += [out async for out in first]
        # Ended: the id can be used again.
        return outs, await collect(engine, "Hello", short, "dup")

    first, again = run(body())
    assert first[-1].outputs[0].finish_reason == "abort"
    assert again[-1].finished and len(again[-1].outputs[0].token_ids) == 2


def test_bad_requests_raise_and_the_others_go_on(engine: AsyncLLM) -> None:
    good_params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    bad = [
        ([1, 2, 10**6], None, "prompt token id 1000000 at position 2 is outside the vocabulary"),
        ("", None, "prompt is empty"),
        ({"text": "hi"}, None, "a prompt dict needs 'prompt' or 'prompt_token_ids'"),
        (["a", "b"], None, "a prompt is a string, a list of token ids, or a dict"),
        ("Hi", SamplingParams(stop_token_ids=[99999]), "stop_token_ids contains 99999"),
        ([1] * 9000, None, "prompt has 9000 tokens; the model's context is 8192"),
    ]

    async def body() -> list[RequestOutput]:
        good = asyncio.create_task(collect(engine, "The capital of France is", good_params, "ok"))
        for i, (prompt, params, message) in enumerate(bad):
            with pytest.raises(ValueError, match=message):
                await collect(engine, prompt, params, f"bad-{i}")
        # Refused by the scheduler once enqueued: its grammar does not compile.
        with pytest.raises(ValueError, match="regex"):
            await collect(engine, "Hi", SamplingParams(regex="(", max_tokens=4), "bad-grammar")
        return await good

    good = run(body())
    assert good[-1].outputs[0].finish_reason == "length"
    assert len(good[-1].outputs[0].token_ids) == 16


def test_a_request_failing_inside_the_engine_raises_and_the_others_go_on(
    engine: AsyncLLM,
) -> None:
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    async def body() -> list[RequestOutput]:
        good = asyncio.create_task(collect(engine, "The capital of France is", params, "fine"))
        with pytest.raises(EngineGenerateError, match="internal error .* fault injected"):
            await collect(engine, "Once upon a time", LONG, f"{FAULTY}-1")
        return await good

    good = run(body())
    assert good[-1].outputs[0].finish_reason == "length"
    assert len(good[-1].outputs[0].token_ids) == 16


def test_prompt_forms(engine: AsyncLLM) -> None:
    text = "The capital of France is"
    ids = engine.tokenizer.encode(text)
    forms = [text, ids, {"prompt": text}, {"prompt_token_ids": ids}]
    params = SamplingParams(temperature=0, max_tokens=4)

    async def body() -> list[RequestOutput]:
        return [(await collect(engine, p, params, f"form-{i}"))[-1] for i, p in enumerate(forms)]

    outs = run(body())
    assert [o.prompt for o in outs] == [text, None, text, None]
    assert all(o.prompt_token_ids == ids for o in outs)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1


def test_shutdown_inside_a_running_loop_aborts_and_releases() -> None:
    """An engine made inside `asyncio.run`: shutting it down ends its live request with
    'abort', refuses later ones, and lets the model and KV pool go (though the engine object
    lives on)."""

    async def body() -> tuple[AsyncLLM, list[RequestOutput], weakref.ref]:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(dtype="float32", max_total_tokens=2048))
        scheduler = weakref.ref(engine._engine._scheduler)
        outs: list[RequestOutput] = []
        started = asyncio.Event()

        async def reader() -> None:
            async for out in engine.generate("Once upon a time", LONG, "r"):
                outs.append(out)
                started.set()

        task = asyncio.create_task(reader())
        await started.wait()
        engine.shutdown()
        await task
        with pytest.raises(EngineDeadError, match="shut down"):
            await anext(engine.generate("Hi", None, "late"))
        with pytest.raises(EngineDeadError):
            await engine.get_kv_stats()
        engine.shutdown()  # idempotent
        return engine, outs, scheduler

    engine, outs, scheduler = run(body())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert not engine.is_running and not engine.errored
    gc.collect()
    assert scheduler() is None, "the scheduler (model, KV pool) outlived shutdown"


def test_example_runs() -> None:
    path = os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "async_llm_streaming.py"), "--max-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("[finished: length]") == 3, out.stdout
    assert out.stdout.count("Generated text:") == 3, out.stdout
