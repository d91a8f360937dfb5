"""API speculative execution for the OpenAI backend.

API speculative execution (`@function(num_api_spec_tokens=K)`) saves calls by generating ahead:
one call makes max(max_tokens, K) tokens with no stop strings, and later gens take their values
from that text while the program keeps agreeing with it. The state lives in `executor.spec`:

    spec.text = program text when the call was made + the completion
                |------------ executor.text_ now -----------|-- rest --|

While `executor.text_` is a prefix of `spec.text`, everything appended since the call (constant
text, role prefixes, earlier gens' values) matched the completion, and a gen's value is the
start of the rest, up to its first stop string. When the program's text diverges, the next gen
makes a fresh call. Comparing prefixes, instead of watching each append, needs no hook in the
executor and sees every append, whatever expression made it.

On a chat model the call is made at a turn's first gen and answers the whole assistant turn:
the constant text before that gen cannot be sent (the chat API cannot continue a turn), so when the reply repeats it the
reply is placed over it, and otherwise the reply continues it. Gens whose output is constrained
(regex, dtype, json_schema) are never speculated: they make their own call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lmprog.lang.ir import GenParams


@dataclass
class Speculation:
    """Text generated ahead of the program: `text` is the program's text at the call plus the
    completion. `finished`: the model ended the completion itself, not the token limit."""

    text: str
    finished: bool
    meta: dict

    def rest(self, program_text: str) -> str | None:
        """What the program has not yet used; None once the program has diverged from it."""
        return self.text[len(program_text) :] if self.text.startswith(program_text) else None


def speculates(executor: Any, params: GenParams) -> bool:
    constrained = params.effective_regex is not None or params.json_schema is not None
    return bool(executor.num_api_spec_tokens) and not constrained


def ahead(params: GenParams, num_api_spec_tokens: int) -> GenParams:
    """The call that generates ahead: max(max_tokens, K) tokens, no stop strings."""
    return dataclasses.replace(
        params,
        stop=None,
        stop_token_ids=None,
        max_tokens=max(params.max_tokens or 0, num_api_spec_tokens),
    )


def decides(rest: str, params: GenParams, finished: bool) -> bool:
    """Whether the speculated rest fixes the gen's value: one of its stop strings occurs there,
    the rest holds max_tokens characters, or the model ended the completion there."""
    if finished or any(stop in rest for stop in params.stops):
        return True
    return params.max_tokens is not None and len(rest) >= params.max_tokens


def take(rest: str, params: GenParams) -> str:
    """The gen's value: the rest up to its first stop string (left in the rest, for the text
    that follows to match), and at most max_tokens characters.

    NOTE: characters stand in for tokens (the API's text has no token boundaries); a token is
    at least one character, so the value is never longer than max_tokens tokens would be.
    """
    cut = min((rest.find(stop) for stop in params.stops if stop in rest), default=len(rest))
    if params.max_tokens is not None:
        cut = min(cut, params.max_tokens)
    return rest[:cut]
