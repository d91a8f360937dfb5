"""Structured outputs over HTTP: native /generate constraints, OpenAI's response_format on chat
and completions, the regex extra, streaming, and 400s for grammars that do not compile."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
import requests

MODEL = "smollm2-135m-instruct"
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "country": {"type": "string", "maxLength": 20},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 1000},
    },
    "required": ["city", "country", "population_millions"],
}
ASK = [{"role": "user", "content": "Describe the capital of Germany as JSON."}]
DATE = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


def test_native_generate_regex_and_json_schema(server) -> None:
    r = requests.post(
        f"{server.url}/generate",
        json={
            "text": ["Today's date is ", "The launch date was "],
            "sampling_params": {"max_new_tokens": 20, "temperature": 0.8, "regex": DATE},
        },
    ).json()
    assert all(re.fullmatch(DATE, item["text"]) for item in r), r
    assert all(item["meta_info"]["finish_reason"]["type"] == "stop" for item in r)
    r = requests.post(
        f"{server.url}/generate",
        json={
            "text": "A city as JSON: ",
            "sampling_params": {
                "max_new_tokens": 60,
                "temperature": 0,
                "json_schema": json.dumps(CITY),
            },
        },
    ).json()
    jsonschema.validate(json.loads(r["text"]), CITY)


def test_openai_response_format_json_schema_and_object(client) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=80,
        temperature=0.7,
        seed=5,
        n=2,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": CITY, "strict": True},
        },
    )
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), CITY)
    obj = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give a JSON object with the keys name and age."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    completion = client.completions.create(
        model=MODEL,
        prompt="The meeting is on ",
        max_tokens=20,
        temperature=0,
        extra_body={"regex": DATE},
    )
    assert re.fullmatch(DATE, completion.choices[0].text)


def test_streamed_json_joins_to_the_same_valid_object(client) -> None:
    kw = {
        "model": MODEL,
        "messages": ASK,
        "max_tokens": 80,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}},
    }
    whole = client.chat.completions.create(**kw).choices[0].message.content
    parts = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**kw, stream=True)
        if c.choices
    ]
    assert "".join(parts) == whole
    jsonschema.validate(json.loads(whole), CITY)


@pytest.mark.parametrize(
    ("route", "body", "needle"),
    [
        ("/generate", {"text": "x", "sampling_params": {"regex": "(unclosed"}}, "invalid regex"),
        (
            "/generate",
            {"text": "x", "sampling_params": {"json_schema": '{"type": "nonsense"}'}},
            "invalid json_schema",
        ),
        (
            "/v1/chat/completions",
            {"messages": ASK, "response_format": {"type": "json_schema"}},
            "json_schema",
        ),
        ("/v1/completions", {"prompt": "x", "regex": "a", "guided_choice": ["b"]}, "at most one"),
        ("/v1/completions", {"prompt": "x", "guided_grammar": "root ::= nowhere"}, "invalid ebnf"),
    ],
)
def test_bad_grammars_are_a_400_and_the_server_keeps_serving(server, route, body, needle) -> None:
    r = requests.post(f"{server.url}{route}", json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    ok = requests.post(
        f"{server.url}/generate",
        json={"text": "1, 2, 3,", "sampling_params": {"max_new_tokens": 2}},
    )
    assert ok.status_code == 200


def test_bad_grammar_in_a_stream_ends_with_an_error_event(server) -> None:
    body = {"text": "x", "stream": True, "sampling_params": {"regex": "[unclosed"}}
    with requests.post(f"{server.url}/generate", json=body, stream=True) as r:
        lines = [line for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert "invalid regex" in json.loads(lines[-2][len("data: ") :])["error"]["message"]
