"""The frontend language without a server: role derivation from chat templates, the choice
methods, prefix tracing, typed gens, and the executor on a scripted backend."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from lmprog.lang import (
    assistant,
    function,
    gen,
    gen_int,
    gen_string,
    select,
    separate_reasoning,
    system,
    user,
)
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
    assert params.effective_regex == r"[-+]?[0-9]+[ \n]*" and params.stops == [" ", "\n"]
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


# ---- SGLang compatibility: programs run with only the import changed ------------------------


class EchoBackend(ScriptedBackend):
    """Answers every gen with "<" + the prompt's last line + ">": deterministic per branch."""

    def generate(self, executor, params: GenParams):
        return "<" + executor.text_.rsplit("\n", 1)[-1] + ">", {}


def test_fork_items_take_in_place_appends() -> None:
    @function
    def branches(s):
        s += "Start.\n"
        forks = s.fork(2)
        for i in range(len(forks)):
            forks[i] += f"Branch {i}:" + gen("indexed")  # SGLang's README writes forks this way
        for i, f in enumerate(forks):
            f += f" again {i}" + gen("iterated")
        forks.join()

    state = branches.run(backend=EchoBackend([]))
    assert state["indexed"] == ["<Branch 0:>", "<Branch 1:>"]
    assert state["iterated"] == ["<Branch 0:<Branch 0:> again 0>", "<Branch 1:<Branch 1:> again 1>"]

    @function
    def replaces(s):
        forks = s.fork(2)
        forks[0] = forks[1]

    with pytest.raises(TypeError, match=r"forks\[0\] cannot be replaced"):
        replaces.run(backend=EchoBackend([]))


def test_typed_gen_regexes_are_sglangs_constants() -> None:
    from lmprog.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR

    assert (REGEX_INT, REGEX_FLOAT) == (r"[-+]?[0-9]+[ \n]*", r"[-+]?[0-9]*\.?[0-9]+[ \n]*")
    assert (REGEX_BOOL, REGEX_STR) == (r"(True|False)", r"\"[\w\d\s]*\"")
    assert gen_int("a").params.effective_regex == REGEX_INT
    assert gen_string("b").params.effective_regex == REGEX_STR
    assert gen("c", dtype=float).params.effective_regex == REGEX_FLOAT
    assert gen("d", dtype="bool").params.effective_regex == REGEX_BOOL
    assert re.fullmatch(REGEX_INT, "-42\n") and re.fullmatch(REGEX_STR, '"two words"')


# Every public name of SGLang's `sglang/__init__.py`, frontend and runtime.
SGLANG_PUBLIC_NAMES = (
    "Engine",
    "Runtime",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "flush_cache",
    "function",
    "gen",
    "gen_int",
    "gen_string",
    "get_server_info",
    "image",
    "select",
    "separate_reasoning",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "user",
    "user_begin",
    "user_end",
    "video",
    "RuntimeEndpoint",
    "greedy_token_selection",
    "token_length_normalized",
    "unconditional_likelihood_normalized",
    "ServerArgs",
    "Anthropic",
    "LiteLLM",
    "OpenAI",
    "VertexAI",
    "global_config",
    "__version__",
)


def test_sglang_public_names_exist_and_unservable_ones_say_why() -> None:
    import lmprog

    assert [n for n in SGLANG_PUBLIC_NAMES if not hasattr(lmprog, n)] == []
    for call in (lambda: lmprog.image("cat.png"), lambda: lmprog.video("clip.mp4", 8)):
        with pytest.raises(NotImplementedError, match="text-only language models"):
            call()
    for name in ("Anthropic", "LiteLLM", "VertexAI"):
        with pytest.raises(NotImplementedError, match="OpenAI-compatible API"):
            getattr(lmprog, name)("some-model")
    with pytest.raises(NotImplementedError, match="lmprog.LLM"):
        lmprog.Engine(model_path="m")
    with pytest.raises(NotImplementedError, match="fork"):
        gen("x", n=2)
    with pytest.raises(NotImplementedError, match="stop_regex"):
        gen("x", stop_regex=r"\d")
    assert gen("x", n=1).params == gen("x").params


def test_global_config_is_the_default_backend_and_refuses_unknown_settings(capsys) -> None:
    import lmprog

    @function
    def hello(s):
        s += "Hello " + gen("name")

    config = lmprog.global_config
    backend = ScriptedBackend(["world"])
    lmprog.set_default_backend(backend)
    try:
        assert config.default_backend is backend
        config.verbosity = 2
        assert hello.run()["name"] == "world"
        assert capsys.readouterr().out == "Hello world\n"
    finally:
        config.default_backend, config.verbosity = None, 0
    with pytest.raises(AttributeError, match="no setting 'enable_parallel_encoding'"):
        config.enable_parallel_encoding = False

    @function
    def long_prefix(s, name):
        s += "A constant instruction, long enough to cache. " * 2 + name

    backend = ScriptedBackend([])
    config.enable_precache_with_tracing = False
    try:
        long_prefix.run_batch([{"name": "a"}, {"name": "b"}], backend=backend)
    finally:
        config.enable_precache_with_tracing = True
    assert backend.cached == []


def test_separate_reasoning_splits_thinking_off_the_answer() -> None:
    @function
    def think(s, model_type):
        s += "Q: 2 + 2?\n"
        s += separate_reasoning(gen("answer"), model_type=model_type)

    qwen = think.run(model_type="qwen3", backend=ScriptedBackend(["<think>Add them.</think>\n\n4"]))
    assert (qwen["answer"], qwen["answer_reasoning_content"]) == ("4", "Add them.")
    assert qwen.text().endswith("<think>Add them.</think>\n\n4")  # the text keeps it all
    r1 = think.run(model_type="deepseek-r1", backend=ScriptedBackend(["Add.</think>4"]))
    assert (r1["answer"], r1["answer_reasoning_content"]) == ("4", "Add.")
    plain = think.run(model_type="qwen3", backend=ScriptedBackend(["4"]))
    assert (plain["answer"], plain["answer_reasoning_content"]) == ("4", "")
    cut = think.run(model_type="qwen3", backend=ScriptedBackend(["<think>Hmm, so"]))
    assert (cut["answer"], cut["answer_reasoning_content"]) == ("", "Hmm, so")
    with pytest.raises(ValueError, match="model_type must be one of deepseek-r1"):
        separate_reasoning(gen("a"), model_type="llama")
    with pytest.raises(ValueError, match="named gen or select"):
        separate_reasoning("text", model_type="qwen3")


def test_state_membership_copy_and_set_var() -> None:
    @function
    def program(s):
        s += "Q:" + gen("a")
        with s.copy() as c:
            c += gen("b")
        s.set_var("c", 3)

    state = program.run(backend=EchoBackend([]))
    assert "a" in state and "missing" not in state  # `in` no longer waits on a variable 0
    assert state["b"] == ["<Q:<Q:>>"] and state["c"] == 3
