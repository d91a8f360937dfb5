"""The request side of tool calls: tools and tool_choice checked as OpenAI checks them, the
grammar that enforces each format's calls (on the real tokenizer, as the scheduler compiles
it), and the prompt: tools given to a template that knows them, described in the system
message for one that does not, chat_template_kwargs passed through."""

from __future__ import annotations

import json

import pytest

from lmprog.runtime.entrypoints.chat_prompt import render_chat, template_knows_tools
from lmprog.runtime.entrypoints.chat_tools import plan_tools
from lmprog.runtime.entrypoints.errors import APIError
from lmprog.runtime.entrypoints.openai_protocol import ChatCompletionRequest
from lmprog.runtime.entrypoints.tool_parsers import get_tool_parser

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(**({"messages": ASK} | fields))


@pytest.fixture(scope="module")
def tokenizer():
    from lmprog.runtime.model_loader import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2-135m-instruct"))


# ---- tools and tool_choice ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "'nope'",
        ),
        ({"tool_choice": "always"}, "tool_choice", "'always' is not one of"),
        ({"tool_choice": {"function": {"name": "now"}}}, "tool_choice", "not a named function"),
        ({"tools": []}, "tools", "empty array"),
        (
            {"tools": [WEATHER | {"function": WEATHER["function"] | {"name": "get weather"}}]},
            "tools.[0].function.name",
            "'get weather' is not a valid function name",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools.[1].function.name", "given twice"),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
                ]
            },
            "tools.[0].function.parameters",
            "type 'object'",
        ),
        ({"tools": None, "tool_choice": "auto"}, "tool_choice", "only allowed when tools"),
        ({"tools": None, "parallel_tool_calls": False}, "parallel_tool_calls", "only allowed"),
        (
            {"tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "cannot be combined",
        ),
    ],
)
def test_bad_tools_or_tool_choice_is_a_400_naming_the_field(fields, param, needle) -> None:
    req = request(**({"tools": [WEATHER, NOW]} | fields))
    with pytest.raises(APIError) as e:
        plan_tools(req, "hermes")
    assert (e.value.status, e.value.param) == (400, param)
    assert needle in e.value.message


def test_a_server_without_a_parser_takes_tools_only_with_tool_choice_none() -> None:
    with pytest.raises(APIError, match="--tool-call-parser") as e:
        plan_tools(request(tools=[WEATHER]), None)
    assert e.value.param == "tools"
    plan = plan_tools(request(tools=[WEATHER], tool_choice="none"), None)
    assert plan.parser is None and plan.tools is None and plan.forced is None


def test_the_plan_of_each_tool_choice() -> None:
    auto = plan_tools(request(tools=[WEATHER, NOW]), "qwen25")
    assert auto.parser is get_tool_parser("hermes") and auto.forced is None
    assert [t["function"]["name"] for t in auto.tools] == ["get_weather", "now"]
    assert "structural_tag" not in auto.sampling_values(request())
    required = plan_tools(request(tools=[WEATHER, NOW], tool_choice="required"), "hermes")
    assert [f["name"] for f in required.forced] == ["get_weather", "now"] and required.parallel
    named = plan_tools(
        request(
            tools=[WEATHER, NOW], tool_choice={"type": "function", "function": {"name": "now"}}
        ),
        "mistral",
    )
    assert named.forced == [{"name": "now", "parameters": {"type": "object", "properties": {}}}]
    assert not named.parallel  # a named function is called once
    values = named.sampling_values(request())
    assert values["skip_special_tokens"] is False  # [TOOL_CALLS] is a special token
    assert json.loads(values["structural_tag"])["type"] == "structural_tag"


# ---- the enforcing grammar ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["hermes", "llama3_json", "mistral"])
def test_the_grammar_takes_exactly_the_formats_calls(tokenizer, name: str) -> None:
    from lmprog.runtime.sampling.constrained.grammar_backend import GrammarBackend
    from lmprog.runtime.sampling.constrained.grammar_spec import GrammarSpec
    from lmprog.runtime.sampling.constrained.matcher import Matcher

    backend = GrammarBackend(tokenizer, tokenizer.vocab_size, [tokenizer.eos_token_id])
    fmt = get_tool_parser(name)
    functions = [
        {"name": "get_weather", "parameters": WEATHER["function"]["parameters"]},
        {"name": "now", "parameters": {"type": "object", "properties": {}}},
    ]

    def accepts(compiled, text: str) -> bool:
        matcher = Matcher(compiled, tokenizer)
        tokens = tokenizer.encode(text, add_special_tokens=False)
        return all(matcher.accept(t) for t in tokens) and matcher.accept(tokenizer.eos_token_id)

    one = fmt.render([("get_weather", '{"city": "Paris", "unit": "celsius"}')])
    two = fmt.render([("get_weather", '{"city": "Paris"}'), ("now", "{}")])
    several = backend.compile(GrammarSpec("structural_tag", fmt.structural_tag(functions, True)))
    single = backend.compile(GrammarSpec("structural_tag", fmt.structural_tag(functions, False)))
    assert accepts(several, one) and accepts(several, two)
    assert accepts(single, one) and not accepts(single, two)
    for bad in (
        "",  # at least one call
        "Sure! " + one,  # nothing but calls
        fmt.render([("get_weather", '{"unit": "celsius"}')]),  # city is required
        fmt.render([("get_weather", '{"city": "Paris", "zip": "75001"}')]),  # no extra keys
        fmt.render([("get_weather", '{"city":"Paris"}')]),  # JSON spaced as json_schema's
        fmt.render([("get_time", "{}")]),  # only the given functions
    ):
        assert not accepts(several, bad), bad


# ---- the prompt ---------------------------------------------------------------------------
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n{%- for tool in tools %}\n{{ tool | tojson }}"
    "{%- endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>"
    '{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}</tool_call>'
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
)
HISTORY = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
]


def test_a_template_that_knows_tools_gets_them(tokenizer, monkeypatch) -> None:
    monkeypatch.setattr(tokenizer, "chat_template", TOOLS_TEMPLATE)
    assert template_knows_tools(tokenizer)
    req = request(
        messages=HISTORY, tools=[WEATHER], chat_template_kwargs={"enable_thinking": False}
    )
    prompt = render_chat(req, tokenizer, plan_tools(req, "hermes"))
    assert json.dumps(WEATHER) in prompt
    # Earlier calls reach the template with their arguments as an object, not as JSON text.
    assert (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt
    )
    assert prompt.endswith("<|im_start|>assistant<think>\n\n</think>\n\n")
    no_kwargs = render_chat(request(), tokenizer, plan_tools(request(), "hermes"))
    assert no_kwargs.endswith("<|im_start|>assistant") and "# Tools" not in no_kwargs


def test_a_template_without_tools_gets_them_in_the_system_message(tokenizer) -> None:
    assert not template_knows_tools(tokenizer)  # SmolLM2's ChatML template
    req = request(messages=HISTORY, tools=[WEATHER])
    prompt = render_chat(req, tokenizer, plan_tools(req, "llama3_json"))
    system, _user, assistant, tool = prompt.split("<|im_end|>\n")[:4]
    assert system.startswith("<|im_start|>system\nYou can call these functions")
    assert json.dumps(WEATHER["function"]) in system
    assert '{"name": "get_weather", "parameters": {"<parameter>": <value>}}' in system
    assert (
        assistant
        == '<|im_start|>assistant\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
    )
    assert tool == "<|im_start|>tool\n22 C, sunny"
    # tool_choice none: the tools are not shown at all.
    none = request(tools=[WEATHER], tool_choice="none")
    assert "You can call" not in render_chat(none, tokenizer, plan_tools(none, "hermes"))


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs", "may not set ['tools']"),
        ({"messages": []}, "messages", "must not be empty"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
                    }
                ]
            },
            "messages.[0].tool_calls",
            "JSON text of an object",
        ),
    ],
)
def test_bad_prompt_input_is_a_400(tokenizer, fields, param, needle) -> None:
    req = request(**fields)
    with pytest.raises(APIError) as e:
        render_chat(req, tokenizer, plan_tools(req, "hermes"))
    assert (e.value.status, e.value.param) == (400, param)
    assert needle in e.value.message
