"""Constrained decoding on the real model: every output matches its regex or parses as JSON
valid against its schema, for greedy and sampled decoding, with and without jump-forward."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from lmprog import SamplingParams

REGEXES = {
    "ip": (
        r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)",
        "The server's IP address is ",
    ),
    "date": (
        r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
        "The meeting date, in ISO format, is ",
    ),
    "integer": (r"-?[1-9]\d{0,5}|0", "The number of planets in the solar system is "),
    "float": (r"-?\d{1,4}\.\d{1,4}", "Pi to two decimal places is "),
    "boolean": (r"(true|false)", "Is water wet? Answer true or false: "),
    "string": (r'"[A-Za-z ]{1,20}"', "The name of the capital of Germany, quoted, is "),
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 20},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "pets", "employed"],
}
ASK_PERSON = [{"role": "user", "content": "Invent a person and describe them as JSON."}]


@pytest.mark.parametrize("kind", sorted(REGEXES))
def test_regex_outputs_always_match(llm, kind: str) -> None:
    regex, prompt = REGEXES[kind]
    greedy = SamplingParams(max_tokens=40, temperature=0, regex=regex)
    sampled = SamplingParams(
        max_tokens=40, temperature=1.0, top_p=0.95, top_k=20, seed=7, n=3, regex=regex
    )
    outs = llm.generate([prompt, prompt], [greedy, sampled], use_tqdm=False)
    for completion in [c for o in outs for c in o.outputs]:
        assert completion.finish_reason == "stop", completion
        assert re.fullmatch(regex, completion.text), (kind, completion.text)


def test_json_schema_outputs_validate(llm) -> None:
    greedy = SamplingParams(max_tokens=120, temperature=0, json_schema=PERSON)
    sampled = SamplingParams(max_tokens=120, temperature=0.9, seed=3, n=3, json_schema=PERSON)
    outs = llm.chat([ASK_PERSON, ASK_PERSON], [greedy, sampled], use_tqdm=False)
    for completion in [c for o in outs for c in o.outputs]:
        assert completion.finish_reason == "stop", completion
        value = json.loads(completion.text)
        jsonschema.validate(value, PERSON)
        assert list(value) == list(PERSON["properties"])  # properties in the schema's order


def test_json_object_choice_and_ebnf(llm) -> None:
    ask = [
        {"role": "user", "content": "Give a JSON object with the keys name and age for a person."}
    ]
    obj = llm.chat(
        ask, SamplingParams(max_tokens=80, temperature=0, json_object=True), use_tqdm=False
    )[0].outputs[0]
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict)
    choice = llm.generate(
        "Q: Is the sun a star?\nA (yes or no):",
        SamplingParams(max_tokens=8, temperature=0.7, seed=1, n=4, choice=["yes", "no"]),
        use_tqdm=False,
    )[0]
    assert all(c.text in ("yes", "no") and c.finish_reason == "stop" for c in choice.outputs)
    grammar = 'root ::= "(" num " + " num ") = " num\nnum ::= [1-9] [0-9]?'
    sums = llm.generate(
        "Write a small sum: ",
        SamplingParams(max_tokens=20, temperature=0, ebnf=grammar),
        use_tqdm=False,
    )[0].outputs[0]
    assert re.fullmatch(r"\([1-9]\d? \+ [1-9]\d?\) = [1-9]\d?", sums.text), sums.text


def test_jump_forward_appends_forced_tokens(llm, engine_factory) -> None:
    stats = llm.scheduler.stats
    before = (stats.jump_forward_tokens, stats.decode_steps)
    out = llm.chat(
        ASK_PERSON,
        SamplingParams(max_tokens=120, temperature=0, json_schema=PERSON),
        use_tqdm=False,
    )[0].outputs[0]
    forced = stats.jump_forward_tokens - before[0]
    steps = stats.decode_steps - before[1]
    assert forced > 5 and steps < len(out.token_ids)  # fewer decode steps than tokens
    plain = engine_factory(seed=0, disable_jump_forward=True, max_total_tokens=4096)
    slow = plain.chat(
        ASK_PERSON,
        SamplingParams(max_tokens=120, temperature=0, json_schema=PERSON),
        use_tqdm=False,
    )[0].outputs[0]
    assert plain.scheduler.stats.jump_forward_tokens == 0
    jsonschema.validate(json.loads(slow.text), PERSON)


def test_short_budget_ends_with_length(llm) -> None:
    out = llm.chat(
        ASK_PERSON, SamplingParams(max_tokens=6, temperature=0, json_schema=PERSON), use_tqdm=False
    )[0].outputs[0]
    assert out.finish_reason == "length" and out.text.startswith('{"name": "')


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"regex": "(unclosed"}, "invalid regex"),
        ({"json_schema": '{"type": "nonsense"}'}, "invalid json_schema"),
        ({"json_schema": "{not json"}, "not valid JSON"),
        ({"ebnf": "root ::= undefined_rule"}, "invalid ebnf"),
    ],
)
def test_bad_grammars_are_refused_before_anything_runs(llm, params: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        llm.generate("x", SamplingParams(max_tokens=4, **params), use_tqdm=False)
    assert not llm.scheduler.has_work()


def test_the_grammar_cache_is_bounded_least_recently_used_out(llm) -> None:
    from lmprog.runtime.sampling.constrained.grammar_backend import GrammarBackend
    from lmprog.runtime.sampling.constrained.grammar_spec import spec_of

    grammars = llm.scheduler.grammars
    backend = GrammarBackend(llm.get_tokenizer(), grammars.vocab_size, grammars.stop_token_ids, 2)
    a, b, c = (spec_of(SamplingParams(regex=r)) for r in ("a+", "b+", "c+"))
    fa = backend.submit(a)
    backend.submit(b)
    assert backend.submit(a) is fa  # a hit, and now the most recently used
    backend.submit(c)  # evicts b, the least recently used
    assert backend.cached == 2
    assert backend.submit(a) is fa
    fb = backend.submit(b)  # compiled again
    assert fb.result() is not None and backend.cached == 2
    backend.shutdown()
