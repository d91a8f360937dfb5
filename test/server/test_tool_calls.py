"""Tool calls and reasoning through the official openai client, on the default server (which
reads hermes calls and qwen3 thinking): tool_choice required and named enforced on the default
model, auto reading what the model wrote, the streamed deltas, and OpenAI's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import openai
import pytest

MODEL = "smollm2-135m-instruct"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}}}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "Time in a timezone", "parameters": TIME},
    },
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
GERMANY = [{"role": "user", "content": "What is the capital of Germany?"}]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


def streamed_calls(chunks: list) -> list:
    return [p for c in chunks if c.choices for p in c.choices[0].delta.tool_calls or []]


def test_a_named_function_is_called_whole_and_streamed(client) -> None:
    kw = {
        "model": MODEL,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 40,
        "temperature": 0,
    }
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)

    chunks = list(client.chat.completions.create(**kw, stream=True))
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.content is None
    pieces = streamed_calls(chunks)
    assert pieces[0].id.startswith("call_") and pieces[0].type == "function"
    assert pieces[0].function.name == "get_weather"
    assert all(p.index == 0 and p.id is None and p.function.name is None for p in pieces[1:])
    assert "".join(p.function.arguments for p in pieces) == call.function.arguments
    assert not any(c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_makes_each_choice_call_a_tool(client) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        n=2,
        max_tokens=40,
        temperature=0.8,
        seed=3,
    )
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert r.choices[0].message.tool_calls[0].id != r.choices[1].message.tool_calls[0].id


WRITTEN_CALL = (
    r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,8}"\}\}\n'
    r"</tool_call>"
)


def test_auto_reads_the_calls_the_model_wrote(client) -> None:
    # The regex only makes the model write a call; reading it is tool_choice auto's own work.
    kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 40, "temperature": 0}
    r = client.chat.completions.create(**kw, extra_body={"regex": WRITTEN_CALL})
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert list(json.loads(call.function.arguments)) == ["city"]
    chunks = list(
        client.chat.completions.create(**kw, stream=True, extra_body={"regex": WRITTEN_CALL})
    )
    assert chunks[0].choices[0].delta.content == ""  # auto: it could have been text
    assert "".join(p.function.arguments for p in streamed_calls(chunks)) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # tool_choice none: no tools in the prompt, the answer is text.
    text = client.chat.completions.create(
        model=MODEL, messages=GERMANY, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0
    )
    assert "Berlin" in text.choices[0].message.content
    assert text.choices[0].message.tool_calls is None


def test_a_conversation_with_calls_and_results_goes_on(client) -> None:
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "call_abc",
            "content": '{"temperature": 22, "sky": "sunny"}',
        },
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, max_tokens=4, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens > 100  # the tools and the earlier call are in the prompt


THOUGHT = r"<think>\n[a-z ]{4,24}\n</think>\n\n(Berlin|Paris|Rome)"


def test_thinking_goes_to_reasoning_content(client) -> None:
    kw = {"model": MODEL, "messages": GERMANY, "max_tokens": 24, "temperature": 0}
    r = client.chat.completions.create(**kw, extra_body={"regex": THOUGHT})
    message = r.choices[0].message
    assert message.content in ("Berlin", "Paris", "Rome")
    assert message.reasoning_content and "<" not in message.reasoning_content
    assert message.reasoning_content == message.reasoning_content.strip()
    chunks = list(client.chat.completions.create(**kw, stream=True, extra_body={"regex": THOUGHT}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert (
        "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        == message.reasoning_content
    )
    assert "".join(d.content or "" for d in deltas) == message.content
    # Thinking turned off in the request: the reply is all content, as written.
    off = client.chat.completions.create(
        **kw, extra_body={"regex": THOUGHT, "chat_template_kwargs": {"enable_thinking": False}}
    )
    assert off.choices[0].message.content.startswith("<think>")
    assert getattr(off.choices[0].message, "reasoning_content", None) is None


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "'nope'",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice", "'sometimes' is not one of"),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools.[0].function.name",
            "'a b'",
        ),
        ({"tools": [{"type": "function"}]}, "tools.[0].function", "Field required"),
        (  # a schema the grammar cannot enforce: found when the scheduler compiles it
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {
                                "type": "object",
                                "properties": {"a": {"type": "objekt"}},
                            },
                        },
                    }
                ],
                "tool_choice": "required",
            },
            "tools",
            "objekt",
        ),
    ],
)
def test_bad_tools_are_openai_400s_and_the_server_goes_on(client, fields, param, needle) -> None:
    kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 4} | fields
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw)
    error = e.value.body
    assert e.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and needle in error["message"]
    ok = client.chat.completions.create(model=MODEL, messages=GERMANY, max_tokens=1)
    assert ok.choices[0].finish_reason == "length"


def test_the_example_runs(server) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "tool_calls.py"),
            "--base-url",
            f"{server.url}/v1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "python")),
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "finish_reason: tool_calls\nget_weather({'city': " in out.stdout, out.stdout
    assert "Answer: " in out.stdout
