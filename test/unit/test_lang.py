"""The frontend language without a server: role derivation from chat templates, the choice
methods, prefix tracing, typed gens, and the executor on a scripted backend."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmprog.lang import assistant, function, gen, select, system, user
from lmprog.lang.backend.base import BaseBackend
from lmprog.lang.chat_template import CHATML, PLAIN, ChatTemplate, derive_roles
from lmprog.lang.choices import (
    ChoicesDecision,
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from lmprog.lang.ir import GenParams
from lmprog.lang.tracer import trace_prefix


def _chatml_render(messages: list[dict], add_generation_prompt: bool) -> str:
    text = ""
    if messages[0]["role"] != "system":
        text += "<|im_start|>system\nBe nice.<|im_end|>\n"
    for m in messages:
        text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _llama3_render(messages: list[dict], add_generation_prompt: bool) -> str:
    text = "<|begin_of_text|>"
    for m in messages:
        text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
    return text


def test_derive_roles_from_chat_templates() -> None:
    chatml = derive_roles(_chatml_render, "m")
    assert chatml.roles == CHATML.roles and chatml.default_system_prompt == "Be nice."
    assert chatml.stop == ["<|im_end|>"]
    llama = derive_roles(_llama3_render, "llama3")
    assert (
        llama.prefix("system") == "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    )
    assert llama.prefix("user") == "<|start_header_id|>user<|end_header_id|>\n\n"
    assert llama.suffix("assistant") == "<|eot_id|>" and llama.default_system_prompt is None

    def odd(messages: list[dict], _: bool) -> str:  # no common turn suffix
        return "".join(f"[{m['role']}] {m['content']} ({m['role']})" for m in messages)

    assert derive_roles(odd) is None
    assert ChatTemplate.from_dict(chatml.to_dict()) == chatml


def _entries(values: list[float]) -> list[list]:
    return [[v, i, f"t{i}"] for i, v in enumerate(values)]


def test_choice_methods() -> None:
    choices = ["a", "bb", "ccc"]
    rows = [_entries([-1.0]), _entries([-0.5, -3.0]), _entries([-0.2, -0.1, -4.0])]
    means = [sum(e[0] for e in r) / len(r) for r in rows]
    kw = {"choices": choices, "normalized_prompt_logprobs": means, "output_token_logprobs": []}
    assert token_length_normalized(input_token_logprobs=rows, **kw).decision == "a"
    # position 0: -0.2 (ccc) is best outright
    assert greedy_token_selection(input_token_logprobs=rows, **kw).decision == "ccc"
    tie = [_entries([-1.0, -5.0]), _entries([-1.0, -0.5])]
    decided = greedy_token_selection(
        choices=["x", "y"],
        normalized_prompt_logprobs=[-3.0, -0.75],
        input_token_logprobs=tie,
        output_token_logprobs=[],
    )
    assert decided.decision == "y"
    uncond = [_entries([-0.9]), _entries([-3.0, -3.5]), _entries([-0.2, -0.1, -4.0])]
    result = unconditional_likelihood_normalized(
        input_token_logprobs=rows, unconditional_token_logprobs=uncond, **kw
    )
    assert result.decision == "bb"  # gains 2.5 and 0.5 from the context
    assert isinstance(result, ChoicesDecision)
    with pytest.raises(ValueError, match="needs unconditional"):
        unconditional_likelihood_normalized(input_token_logprobs=rows, **kw)


class ScriptedBackend(BaseBackend):
    """Answers gens from a list and selects the first choice; records the prompts it saw."""

    def __init__(self, answers: list[str], template: ChatTemplate = PLAIN) -> None:
        self.answers = list(answers)
        self.template = template
        self.prompts: list[str] = []
        self.cached: list[str] = []

    def get_chat_template(self) -> ChatTemplate:
        return self.template

    def generate(self, executor, params: GenParams):
        self.prompts.append(executor.text_)
        return self.answers.pop(0), {"params": params}

    def select(self, executor, choices, temperature, method):
        self.prompts.append(executor.text_)
        return ChoicesDecision(choices[-1], {"n": len(choices)})

    def cache_prefix(self, prefix: str) -> None:
        self.cached.append(prefix)


def test_executor_roles_variables_and_defaults() -> None:
    @function
    def chat(s, question):
        s += system("Sys.")
        s += user(question)
        s += assistant(gen("answer", max_tokens=5))
        s += user("Pick.") + assistant(select("pick", ["x", "y"]))

    backend = ScriptedBackend(["Fine."], CHATML)
    state = chat.run(question="How are you?", temperature=0.3, backend=backend)
    assert state["answer"] == "Fine." and state["pick"] == "y"
    assert [m["content"] for m in state.messages()] == [
        "Sys.",
        "How are you?",
        "Fine.",
        "Pick.",
        "y",
    ]
    assert backend.prompts[0].endswith("<|im_start|>assistant\n")
    params = state.get_meta_info("answer")["params"]
    assert (params.max_tokens, params.temperature) == (5, 0.3)  # own value, then run()'s default


def test_tracer_stops_at_the_first_argument_or_call() -> None:
    @function
    def program(s, question):
        s += system("You answer briefly.")
        s += user("Question: " + question)
        s += assistant(gen("a"))

    prefix = trace_prefix(program, ScriptedBackend([], CHATML))
    # `"Question: " + question` uses the argument before user(...) runs
    assert prefix == "<|im_start|>system\nYou answer briefly.<|im_end|>\n"

    @function
    def role_block(s, question):
        s += system("You answer briefly.")
        with s.user():
            s += "Question: "
            s += question

    assert trace_prefix(role_block, ScriptedBackend([], CHATML)).endswith(
        "<|im_start|>user\nQuestion: "
    )

    @function
    def fstring(s, name):
        s += "Constant part. " * 4
        s += f"Hello {name}"

    assert trace_prefix(fstring, ScriptedBackend([])) == "Constant part. " * 4
    backend = ScriptedBackend([])
    fstring.run_batch([{"name": "a"}, {"name": "b"}], backend=backend)
    assert backend.cached == ["Constant part. " * 4]


def test_dtype_gens_become_regexes_and_bad_dtypes_fail_early() -> None:
    params = gen("x", dtype=int).params
    assert params.effective_regex == r"[-+]?[0-9]+" and params.stops == [" ", "\n"]
    assert gen("y", dtype="bool").params.effective_regex == "(True|False)"
    with pytest.raises(ValueError, match="dtype must be one of"):
        gen("z", dtype=list)
    assert gen("c", choices=["a", "b"]).choices == ["a", "b"]  # gen(choices=...) is a select
    with pytest.raises(ValueError, match="non-empty list"):
        select("s", [])


def test_errors_reach_the_caller_and_no_backend_is_clear() -> None:
    @function
    def needs_two(s):
        s += gen("a") + gen("b")

    with pytest.raises(IndexError):
        needs_two.run(backend=ScriptedBackend(["only one"]))
    with pytest.raises(ValueError, match="no backend"):
        needs_two.run()


def test_importing_the_language_does_not_import_torch() -> None:
    code = "import sys, lmprog; from lmprog import function, gen, RuntimeEndpoint; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
