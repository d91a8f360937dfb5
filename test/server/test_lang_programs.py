"""Frontend programs (`from lmprog import function, gen, ...`) on the real server through
RuntimeEndpoint: chat turns, select, fork/join, streaming, typed gens, tools, run_batch.

Checks are ones a 135M model passes honestly: structure, types and parseable values; knowledge
only where it is reliable (Germany's capital, 2 + 2)."""

from __future__ import annotations

import asyncio
import re

import pytest

import lmprog as sgl
from lmprog import (
    assistant,
    function,
    gen,
    gen_int,
    select,
    system,
    user,
)


@pytest.fixture(scope="module")
def backend(server):
    return sgl.RuntimeEndpoint(server.url)


@function
def multi_turn(s, question_1, question_2):
    s += system("You are a helpful assistant.")
    s += user(question_1)
    s += assistant(gen("answer_1", max_tokens=24))
    s += user(question_2)
    s += assistant(gen("answer_2", max_tokens=24))


def test_multi_turn_chat_keeps_every_turn(backend) -> None:
    state = multi_turn.run(
        question_1="What is the capital of Germany?",
        question_2="And what is 2 + 2?",
        temperature=0,
        backend=backend,
    )
    roles = [m["role"] for m in state.messages()]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert "Berlin" in state["answer_1"]
    assert state.messages()[2]["content"] == state["answer_1"]
    # the prompt is the model's own chat format
    assert state.text().startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_default_system_prompt_and_role_blocks(backend) -> None:
    @function
    def no_system(s):
        with s.user():
            s += "What is the capital of Germany?"
        with s.assistant():
            s += gen("answer", max_tokens=16)

    state = no_system.run(temperature=0, backend=backend)
    first = state.messages()[0]
    assert first["role"] == "system" and "SmolLM" in first["content"]  # as the template adds
    assert "Berlin" in state["answer"]


def test_select_scores_choices_and_methods(backend) -> None:
    @function
    def capital(s, method):
        s += "The capital of Germany is"
        s += select("city", [" Berlin", " a banana split", " the moon"], choices_method=method)

    for method in (
        sgl.token_length_normalized,
        sgl.greedy_token_selection,
        sgl.unconditional_likelihood_normalized,
    ):
        state = capital.run(method=method, backend=backend)
        assert state["city"] == " Berlin", method
        meta = state.get_meta_info("city")
        assert len(meta["normalized_prompt_logprobs"]) == 3
        assert state.text().endswith("The capital of Germany is Berlin")
    meta = capital.run(method=sgl.unconditional_likelihood_normalized, backend=backend)
    assert len(meta.get_meta_info("city")["unconditional_token_logprobs"]) == 3


def test_select_on_true_false_unknown_statements(backend) -> None:
    @function
    def judge(s, statement):
        s += user(f"Is this statement true, false or unknown? {statement}")
        s += assistant("The statement is " + select("verdict", ["true", "false", "unknown"]))

    statements = ["Berlin is in Germany.", "Fish can fly to the moon.", "It will rain in 2090."]
    states = judge.run_batch([{"statement": x} for x in statements], backend=backend)
    for state in states:
        assert state["verdict"] in ("true", "false", "unknown")
        scores = state.get_meta_info("verdict")["normalized_prompt_logprobs"]
        assert all(score < 0 for score in scores)


def test_fork_parallel_decoding_and_join(backend) -> None:
    @function
    def tips(s, topic):
        s += f"Here are three short tips about {topic}.\n"
        forks = s.fork(3)
        forks += lambda i: f"Tip {i + 1}:" + gen("tip", max_tokens=12, stop="\n")
        forks.join()
        s += "In summary: " + gen("summary", max_tokens=12, stop="\n")

    state = tips.run(topic="staying healthy", temperature=0.8, backend=backend)
    assert isinstance(state["tip"], list) and len(state["tip"]) == 3
    assert all(isinstance(t, str) for t in state["tip"])
    # the branches' text stays in the branches
    intro = "Here are three short tips about staying healthy.\n"
    assert state.text() == intro + "In summary: " + state["summary"]


def test_fork_items_written_the_sglang_way(backend) -> None:
    @sgl.function
    def expand(s):
        s += "Two tips for sleeping well: 1. Keep a schedule. 2. Avoid screens.\n"
        forks = s.fork(2)
        for i in range(2):
            forks[i] += f"Tip {i + 1} in one sentence:"
            forks[i] += sgl.gen("detail", max_tokens=12, stop="\n")
        s["details"] = [forks[0]["detail"], forks[1]["detail"]]
        s += "Tip 1:" + s["details"][0] + "\nTip 2:" + s["details"][1] + "\n"
        s += "Score the tips from 1 to 9: " + sgl.gen_int("score", max_tokens=3)

    state = expand.run(temperature=0, backend=backend)
    first, second = state["details"]
    assert f"Tip 1:{first}\nTip 2:{second}\n" in state.text()
    assert "in one sentence" not in state.text()  # the branches' prompts stay in the branches
    int(state["score"])  # REGEX_INT lets the number end in whitespace; its stop strings cut it


def test_parallel_encoding_with_concate_and_append(backend) -> None:
    @function
    def answer_from(s, facts, question):
        s += "Read the facts.\n"
        forks = s.fork(len(facts))
        forks += lambda i: f"Fact {i + 1}: {facts[i]}\n"
        forks.join("concate_and_append")
        s += f"Question: {question}\nAnswer:" + gen("answer", max_tokens=8, stop="\n")

    facts = ["The capital of Germany is Berlin.", "Berlin has many museums."]
    state = answer_from.run(
        facts=facts, question="What is Germany's capital?", temperature=0, backend=backend
    )
    text = state.text()
    assert (
        text.index("Fact 1: The capital")
        < text.index("Fact 2: Berlin has")
        < text.index("Question")
    )
    assert "Berlin" in state["answer"]


@function
def two_turns(s, question_1, question_2):
    s += user(question_1)
    s += assistant(gen("answer_1", max_tokens=10))
    s += user(question_2)
    s += assistant(gen("answer_2", max_tokens=10))


def test_streaming_joins_to_the_same_text(backend) -> None:
    kwargs = {"question_1": "Name a color.", "question_2": "Name another.", "temperature": 0}
    whole = two_turns.run(backend=backend, **kwargs)
    streamed = two_turns.run(backend=backend, stream=True, **kwargs)
    pieces = list(streamed.text_iter())
    assert "".join(pieces) == whole.text() and len(pieces) > 5
    again = two_turns.run(backend=backend, stream=True, **kwargs)
    assert "".join(again.text_iter("answer_2")) == whole["answer_2"]

    async def collect() -> str:
        state = two_turns.run(backend=backend, stream=True, **kwargs)
        return "".join([piece async for piece in state.text_async_iter("answer_1")])

    assert asyncio.run(collect()) == whole["answer_1"]


def test_typed_and_regex_gens_parse(backend) -> None:
    @function
    def typed(s):
        s += user("What is 2 + 2? Answer with a number.")
        s += assistant(gen_int("sum", max_tokens=4))
        s += user("What is pi to two decimal places?")
        s += assistant(gen("pi", dtype=float, max_tokens=6))
        s += user("Is water wet? Answer True or False.")
        s += assistant(gen("wet", dtype=bool))
        s += user("When did humans first land on the moon? Give the date as YYYY-MM-DD.")
        s += assistant(gen("date", regex=r"\d{4}-\d{2}-\d{2}"))

    for temperature in (0, 1.0):
        state = typed.run(temperature=temperature, backend=backend)
        int(state["sum"])
        float(state["pi"])
        assert state["wet"] in ("True", "False")
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", state["date"])
        assert state.messages()[-1]["content"] == state["date"]


def test_tool_use_with_a_calculator_between_gens(backend) -> None:
    @function
    def calculator_agent(s, question):
        s += f"Question: {question}\nWrite the arithmetic expression to compute.\nExpression: "
        s += gen("expr", regex=r"[0-9]{1,3} [+*-] [0-9]{1,3}", temperature=0)
        value = eval(s["expr"], {"__builtins__": {}})
        s += f"\nResult: {value}\nSo the answer is " + gen("answer", max_tokens=8, stop="\n")
        s["value"] = value

    state = calculator_agent.run(question="What is 12 times 3?", temperature=0, backend=backend)
    assert re.fullmatch(r"\d+ [+*-] \d+", state["expr"])
    assert f"Result: {state['value']}" in state.text()
    assert isinstance(state["answer"], str)


def test_react_style_loop_with_select(backend) -> None:
    @function
    def react(s, task):
        s += f"Task: {task}\n"
        for step in range(3):
            s += f"Thought {step + 1}:" + gen(f"thought_{step}", max_tokens=10, stop="\n") + "\n"
            s += f"Action {step + 1}: " + select(f"action_{step}", ["search", "finish"]) + "\n"
            if s[f"action_{step}"] == "finish":
                break
            s += f"Observation {step + 1}: nothing found.\n"

    state = react.run(task="Find the capital of Germany.", temperature=0, backend=backend)
    actions = [state.stream_executor.variables.get(f"action_{i}") for i in range(3)]
    taken = [a for a in actions if a is not None]
    assert taken and all(a in ("search", "finish") for a in taken)
    assert taken[-1] == "finish" or len(taken) == 3


FEW_SHOT = "".join(
    f"Question: What is {a} plus {b}?\nAnswer: {a + b}\n\n"
    for a, b in [(1, 1), (2, 3), (4, 4), (5, 2), (3, 6), (7, 1)] * 3
)


@function
def few_shot(s, question):
    s += FEW_SHOT
    s += f"Question: {question}\nAnswer:" + gen("answer", max_tokens=6, stop="\n")


def test_run_batch_prefills_the_constant_prefix_once(server, backend) -> None:
    assert backend.flush_cache()
    before = backend.get_server_info()["scheduler"]
    questions = [{"question": f"What is {i} plus {i % 3}?"} for i in range(16)]
    states = few_shot.run_batch(questions, backend=backend, temperature=0, num_threads=16)
    after = backend.get_server_info()["scheduler"]
    assert all(s["answer"].strip() for s in states)
    prefix_tokens = len(backend._post("/tokenize", {"text": FEW_SHOT})["tokens"])
    hits = after["cache_hit_tokens"] - before["cache_hit_tokens"]
    computed = after["prefill_tokens"] - before["prefill_tokens"]
    assert hits >= 16 * (prefix_tokens - 8)  # every program found the prefix cached
    assert computed < 2 * prefix_tokens + 16 * 40  # the prefix was computed about once


def test_errors_inside_a_program_surface(backend) -> None:
    @function
    def bad_regex(s):
        s += "x" + gen("y", regex="(unclosed", max_tokens=4)

    with pytest.raises(RuntimeError, match="invalid regex"):
        bad_regex.run(backend=backend)

    @function
    def raises(s):
        s += "x"
        raise ValueError("the program's own bug")

    with pytest.raises(ValueError, match="own bug"):
        raises.run(backend=backend)
    streamed = bad_regex.run(backend=backend, stream=True)
    with pytest.raises(RuntimeError, match="invalid regex"):
        list(streamed.text_iter())


def test_var_scope_captures_text(backend) -> None:
    @function
    def scoped(s):
        s += "Start. "
        with s.var_scope("middle"):
            s += "Inside " + gen("word", max_tokens=3, stop="\n")
        s += " End."

    state = scoped.run(temperature=0, backend=backend)
    assert state["middle"] == "Inside " + state["word"]
    assert state.text() == "Start. " + state["middle"] + " End."
