"""The OpenAI backend against lmprog's own OpenAI-compatible server (SmolLM2-135M-Instruct):
the same model used as a chat model and as a completion model, selects, streaming, API
speculative execution, and API errors."""

from __future__ import annotations

import re

import openai
import pytest

from lmprog.lang import OpenAI, assistant, function, gen, gen_int, select, user

MODEL = "smollm2-135m-instruct"
# Few-shot records: the model continues them in the same format.
RECORDS = "Name: Alice\nAge: 30\nName: Bob\nAge: 25\nName: "


@pytest.fixture(scope="module")
def base_url(server) -> str:
    """The session's default server, through its OpenAI-compatible routes."""
    return f"{server.url}/v1"


@pytest.fixture(scope="module")
def chat(base_url: str) -> OpenAI:
    return OpenAI(MODEL, base_url=base_url, is_chat_model=True)


@pytest.fixture(scope="module")
def completion(base_url: str) -> OpenAI:
    return OpenAI(MODEL, base_url=base_url, is_chat_model=False)


# ---- no server --------------------------------------------------------------------------------
def test_chat_or_completion_is_guessed_from_the_name() -> None:
    url = "http://127.0.0.1:1/v1"  # never contacted
    assert not OpenAI("gpt-3.5-turbo-instruct", base_url=url).is_chat_model
    assert OpenAI("gpt-4o-mini", base_url=url).is_chat_model
    assert OpenAI(MODEL, base_url=url).is_chat_model
    assert OpenAI(MODEL, base_url=url, is_chat_model=False).get_chat_template().name == "plain"


def test_api_key_falls_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "http://127.0.0.1:1/v1"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert OpenAI(MODEL, base_url=url).client.api_key == "EMPTY"  # a local server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert OpenAI(MODEL, base_url=url).client.api_key == "sk-test"
    assert OpenAI(MODEL, base_url=url, api_key="mine").client.api_key == "mine"


# ---- chat models ------------------------------------------------------------------------------
@function
def capitals(s):
    s += user("What is the capital of Germany?")
    s += assistant(gen("germany", max_tokens=10))
    s += user("And of France?")
    s += assistant(gen("france", max_tokens=4))


def test_chat_program_sends_every_turn(chat: OpenAI) -> None:
    state = capitals.run(backend=chat, temperature=0)
    messages = state.messages()
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert messages[1]["content"] == state["germany"]
    assert messages[3]["content"] == state["france"]
    assert "Berlin" in state["germany"]
    assert state.text() == "".join(m["content"] for m in messages)  # no role markup
    assert state.get_meta_info("germany")["finish_reason"] in ("stop", "length")


def test_chat_gen_must_open_an_assistant_turn(chat: OpenAI) -> None:
    @function
    def outside(s):
        s += user("Hi") + gen("x", max_tokens=4)

    @function
    def after_text(s):
        s += user("Hi")
        s += assistant("Well, " + gen("x", max_tokens=4))

    calls = chat.num_calls
    with pytest.raises(ValueError, match="only inside an assistant turn; this gen is in no turn"):
        outside.run(backend=chat)
    with pytest.raises(
        ValueError, match="at the start of an assistant turn; this turn already has"
    ):
        after_text.run(backend=chat)
    assert chat.num_calls == calls  # refused before any call


@function(num_api_spec_tokens=6)
def two_words(s):
    s += user("What is the capital of Germany?")
    s += assistant(gen("first", stop=" ") + " " + gen("second", stop=" "))


def test_chat_speculation_answers_a_turn_with_one_call(chat: OpenAI) -> None:
    calls = chat.num_calls
    state = two_words.run(backend=chat, temperature=0, max_new_tokens=6)
    assert chat.num_calls == calls + 1
    first, second = state["first"], state["second"]
    assert first and second and " " not in first + second
    assert state.messages()[-1] == {"role": "assistant", "content": f"{first} {second}"}
    assert state.get_meta_info("second")["from_pending"]


# ---- completion models ------------------------------------------------------------------------
def _record(s):
    s += RECORDS + gen("name", stop="\n") + "\nAge: " + gen("age", stop="\n")


def test_completion_gens_stop_and_speculation_saves_calls(completion: OpenAI) -> None:
    calls = {}
    for spec in (None, 16):
        before = completion.num_calls
        state = function(num_api_spec_tokens=spec)(_record).run(
            backend=completion, temperature=0, max_new_tokens=8
        )
        calls[spec] = completion.num_calls - before
        name, age = state["name"], state["age"]
        assert name and age and "\n" not in name + age
        assert state.text() == f"{RECORDS}{name}\nAge: {age}"
    assert calls == {None: 2, 16: 1}


def test_constrained_gens_are_not_speculated(completion: OpenAI) -> None:
    @function(num_api_spec_tokens=16)
    def typed(s):
        s += RECORDS + gen("name", regex="[A-Z][a-z]+", max_tokens=4)
        s += "\nAge: " + gen_int("age", max_tokens=3)

    before = completion.num_calls
    state = typed.run(backend=completion, temperature=0)
    assert re.fullmatch("[A-Z][a-z]+", state["name"]), state["name"]
    assert re.fullmatch("[-+]?[0-9]+", state["age"]), state["age"]
    assert completion.num_calls == before + 2  # one call each, constrained by the server
    assert not state.get_meta_info("age").get("from_pending")


def test_completion_select_scores_each_choice(completion: OpenAI) -> None:
    @function
    def sky(s):
        s += "The color of the clear sky is " + select("color", ["blue", "green", "red"])

    state = sky.run(backend=completion)
    meta = state.get_meta_info("color")
    scores = meta["normalized_prompt_logprobs"]
    assert state["color"] == ["blue", "green", "red"][scores.index(max(scores))]
    for choice, entries in zip(["blue", "green", "red"], meta["input_token_logprobs"]):
        # The choice's tokens only, the boundary token (" blue") included.
        assert "".join(e[2] for e in entries).strip() == choice
        assert all(e[0] < 0 for e in entries)


# ---- both -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_text_matches_the_whole(kind: str, request: pytest.FixtureRequest) -> None:
    backend = request.getfixturevalue(kind)

    @function
    def answer(s):
        s += user("What is 2 + 3?")
        s += assistant(gen("answer", max_tokens=5))

    whole = answer.run(backend=backend, temperature=0)
    streamed = answer.run(backend=backend, temperature=0, stream=True)
    pieces = list(streamed.text_iter())
    assert "".join(pieces) == whole.text()
    assert streamed["answer"] == whole["answer"]
    assert streamed.get_meta_info("answer")["completion_tokens"] > 0


def test_api_error_surfaces_from_run(base_url: str) -> None:
    backend = OpenAI("no-such-model", base_url=base_url, is_chat_model=False)

    @function
    def program(s):
        s += "Hello" + gen("x", max_tokens=2)

    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        program.run(backend=backend)
    assert backend.num_calls == 1
