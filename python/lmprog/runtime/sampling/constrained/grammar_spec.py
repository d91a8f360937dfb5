"""GrammarSpec: the one constraint a request carries, in a hashable form (the compile cache key).

Kinds: "regex", "json_schema" (a JSON Schema, as canonical JSON text), "json_object" (any JSON
object), "ebnf" (a GBNF/EBNF grammar with a `root` rule) and "structural_tag" (xgrammar's
structural tag, as JSON text: how tool calls are enforced). A `choice` list becomes a regex
that matches exactly one of the strings.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

GRAMMAR_KINDS = ("regex", "json_schema", "json_object", "ebnf", "structural_tag")


@dataclass(frozen=True)
class GrammarSpec:
    kind: str
    source: str  # the regex, the schema as JSON text, the EBNF; "" for json_object

    def __post_init__(self) -> None:
        assert self.kind in GRAMMAR_KINDS, self.kind


def choice_regex(choices: list[str]) -> str:
    """A regex matching exactly one of `choices` (regex metacharacters escaped)."""
    return "(" + "|".join(_escape(c) for c in choices) + ")"


def _escape(text: str) -> str:
    # xgrammar's regex dialect is ECMAScript-like: escape every metacharacter Python escapes,
    # except characters Python escapes that ECMAScript would treat as literal anyway.
    return re.sub(r"([\\^$.|?*+()\[\]{}/-])", r"\\\1", text)


def spec_of(params: Any) -> GrammarSpec | None:
    """The constraint of SamplingParams-like `params` (at most one is set; validated there)."""
    if params.regex is not None:
        return GrammarSpec("regex", params.regex)
    if params.choice is not None:
        return GrammarSpec("regex", choice_regex(params.choice))
    if params.json_schema is not None:
        schema = params.json_schema
        # Key order is kept: it is the order the grammar generates properties in.
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return GrammarSpec("json_schema", text)
    if params.json_object:
        return GrammarSpec("json_object", "")
    if params.ebnf is not None:
        return GrammarSpec("ebnf", params.ebnf)
    if params.structural_tag is not None:
        return GrammarSpec("structural_tag", params.structural_tag)
    return None
