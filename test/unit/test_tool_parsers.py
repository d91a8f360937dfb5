"""Tool-call and reasoning parsers on replies as models write them (Qwen2.5/3, Hermes, Llama
3.1/3.2, Mistral v0.3 and v11 tokenizers, DeepSeek-R1): the message of a whole reply, and the
same message from the reply streamed in pieces of every size (markers cut in two)."""

from __future__ import annotations

import json

import pytest

from lmprog.runtime.entrypoints.chat_output import ChoiceParser
from lmprog.runtime.entrypoints.reasoning_parser import ReasoningParser
from lmprog.runtime.entrypoints.tool_parsers import (
    TOOL_PARSER_NAMES,
    canonical_tool_parser,
    get_tool_parser,
)

WEATHER = ("get_weather", {"city": "Paris", "unit": "celsius"})

# (parser, reply as the model wrote it, content, [(name, arguments)])
RECORDED = [
    (  # Qwen2.5-7B-Instruct, two parallel calls (as in Qwen's function-calling guide)
        "hermes",
        (
            '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San '
            'Francisco, CA, USA"}}\n</tool_call>\n<tool_call>\n{"name": "get_temperature_date", '
            '"arguments": {"location": "San Francisco, CA, USA", "date": "2024-10-01"}}\n'
            "</tool_call>"
        ),
        None,
        [
            ("get_current_temperature", {"location": "San Francisco, CA, USA"}),
            ("get_temperature_date", {"location": "San Francisco, CA, USA", "date": "2024-10-01"}),
        ],
    ),
    (  # Hermes-2-Pro: text first, arguments with braces inside strings
        "hermes",
        (
            "Let me look that up for you.\n<tool_call>\n"
            '{"arguments": {"query": "set {x} to \\"}\\"", "limit": 3}, "name": "search"}\n'
            "</tool_call>"
        ),
        "Let me look that up for you.\n",
        [("search", {"query": 'set {x} to "}"', "limit": 3})],
    ),
    (  # cut short by max_tokens inside the call: no closing tag, the JSON is whole
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
        None,
        [WEATHER],
    ),
    ("hermes", "The capital of Germany is Berlin.", "The capital of Germany is Berlin.", []),
    (  # a broken call is the model's text, as written
        "hermes",
        "<tool_call>\nget_weather(Paris)\n</tool_call> sorry",
        "<tool_call>\nget_weather(Paris)\n</tool_call> sorry",
        [],
    ),
    (  # Llama-3.2-3B-Instruct
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        None,
        [WEATHER],
    ),
    (  # Llama-3.1-8B-Instruct with <|python_tag|> (decoded), two calls, text before
        "llama3_json",
        (
            'I will check both. <|python_tag|>{"name": "get_weather", "parameters": {"city": '
            '"Paris", "unit": "celsius"}}; {"name": "get_time", "parameters": {"tz": "CET"}}'
        ),
        "I will check both. ",
        [WEATHER, ("get_time", {"tz": "CET"})],
    ),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),  # JSON, but not a call
    (  # Mistral-7B-Instruct-v0.3
        "mistral",
        (
            '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
            '"celsius"}}, {"name": "get_time", "arguments": {"tz": "CET"}}]'
        ),
        None,
        [WEATHER, ("get_time", {"tz": "CET"})],
    ),
    (  # Mistral-Small-3.2 (tokenizer v11+): name[ARGS]{...}, a [CALL_ID] on the second
        "mistral",
        (
            'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
            '[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{"tz": "CET"}'
        ),
        "Sure.",
        [WEATHER, ("get_time", {"tz": "CET"})],
    ),
    ("mistral", "Use [brackets] freely.", "Use [brackets] freely.", []),
]


def streamed(parser: ChoiceParser, text: str, size: int) -> dict:
    """The message the streamed deltas of `text`, in pieces of `size`, join to."""
    pieces = [text[i : i + size] for i in range(0, len(text), size)] or [""]
    deltas = [parser.feed(p, last=k == len(pieces) - 1) for k, p in enumerate(pieces)]
    calls: dict[int, dict] = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            if "id" in c:
                assert c["index"] not in calls, "a call is announced once"
                assert c["id"].startswith("call_") and c["type"] == "function"
                calls[c["index"]] = {"id": c["id"], "type": "function", "function": c["function"]}
            else:
                calls[c["index"]]["function"]["arguments"] += c["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls))), "calls are numbered 0, 1, ..."
    content = "".join(d.get("content", "") for d in deltas)
    message = {"role": "assistant", "content": content}
    if parser.reasoning is not None:
        message["reasoning_content"] = "".join(d.get("reasoning_content", "") for d in deltas)
        message["reasoning_content"] = message["reasoning_content"] or None
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
        message["content"] = content if content.strip() else None
    return message


def without_ids(message: dict) -> dict:
    calls = [c["function"] for c in message.get("tool_calls", [])]
    return {k: v for k, v in message.items() if k != "tool_calls"} | {"calls": calls}


@pytest.mark.parametrize(("name", "reply", "content", "calls"), RECORDED)
def test_recorded_replies_parse_whole_and_streamed(name, reply, content, calls) -> None:
    message = ChoiceParser(None, get_tool_parser(name)).message(reply)
    assert message["content"] == content
    got = [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in message.get("tool_calls", [])
    ]
    assert got == calls
    for size in (1, 2, 3, 5, 8, 13):
        parser = ChoiceParser(None, get_tool_parser(name))
        assert without_ids(streamed(parser, reply, size)) == without_ids(message), size
        assert parser.finish_reason("stop") == ("tool_calls" if calls else "stop")
        assert parser.finish_reason("length") == "length"


def test_arguments_stream_in_pieces_as_the_model_writes_them() -> None:
    parser = ChoiceParser(None, get_tool_parser("hermes"))
    first = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"ci')
    (call,) = first["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"ci'}
    assert parser.feed('ty": "Par') == {
        "tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Par'}}]
    }
    # The arguments end at their closing brace: the call object's own is not theirs.
    assert parser.feed('is"}}\n</tool') == {
        "tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]
    }
    assert parser.feed("_call>", last=True) == {}
    assert parser.finish_reason("stop") == "tool_calls"


@pytest.mark.parametrize("name", ["hermes", "llama3_json", "mistral"])
def test_rendered_calls_parse_back(name: str) -> None:
    fmt = get_tool_parser(name)
    calls = [("get_weather", '{"city": "Paris"}'), ("now", "{}")]
    message = ChoiceParser(None, fmt).message(fmt.render(calls))
    assert [
        (c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]
    ] == calls
    assert message["content"] is None


def test_parser_names_and_aliases() -> None:
    assert {canonical_tool_parser(n) for n in TOOL_PARSER_NAMES} == {
        "hermes",
        "llama3_json",
        "mistral",
    }
    assert get_tool_parser("qwen25") is get_tool_parser("hermes")
    assert get_tool_parser("llama3") is get_tool_parser("llama3_json")
    with pytest.raises(ValueError, match="one of hermes, llama3_json, mistral"):
        get_tool_parser("pythonic")


# (format, reply, reasoning, content)
THINKING = [
    (
        "qwen3",
        "<think>\nThe user asks for the capital.\n</think>\n\nBerlin.",
        "The user asks for the capital.",
        "Berlin.",
    ),
    ("qwen3", "Berlin.", None, "Berlin."),  # enable_thinking off: no <think>
    ("qwen3", "  <think>cut short by max_tokens", "cut short by max_tokens", ""),
    ("deepseek-r1", "Okay, 2 + 2 is 4.\n</think>\n\n**4**", "Okay, 2 + 2 is 4.", "**4**"),
    ("deepseek-r1", "<think>\nOkay.\n</think>\n\n4", "Okay.", "4"),
    ("kimi", "◁think▷Short.◁/think▷Long answer.", "Short.", "Long answer."),
]


@pytest.mark.parametrize(("fmt", "reply", "reasoning", "content"), THINKING)
def test_reasoning_splits_whole_and_streamed(fmt, reply, reasoning, content) -> None:
    message = ChoiceParser(fmt, None).message(reply)
    assert (message["reasoning_content"], message["content"]) == (reasoning, content)
    for size in (1, 2, 3, 7):
        assert streamed(ChoiceParser(fmt, None), reply, size) == message


def test_calls_in_the_answer_not_in_the_thinking() -> None:
    reply = (
        "<think>\nI could write <tool_call> here, but I should call get_weather.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    message = ChoiceParser("qwen3", get_tool_parser("hermes")).message(reply)
    assert message["reasoning_content"].startswith("I could write <tool_call> here")
    assert message["content"] is None
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    for size in (1, 4):
        parser = ChoiceParser("qwen3", get_tool_parser("hermes"))
        assert without_ids(streamed(parser, reply, size)) == without_ids(message)


def test_unknown_reasoning_format_names_the_choices() -> None:
    with pytest.raises(ValueError, match="qwen3"):
        ReasoningParser("o1")
