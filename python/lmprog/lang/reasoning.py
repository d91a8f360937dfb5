"""separate_reasoning: split a reasoning model's thinking off the value of a gen.

Reasoning models write their thinking between two markers before the answer:

    <think>The user wants the sum; 2 + 2 is 4.</think>

    4

`s += separate_reasoning(gen("answer"), model_type="qwen3")` leaves "4" in `answer` and the
thinking in `answer_reasoning_content`. The program's text keeps both as the model wrote them,
so the next gen continues from exactly what the model produced.

The formats are named by SGLang's `model_type`s for the plain-marker formats:

    model_type       markers                  the output starts inside the thinking
    deepseek-r1      <think> ... </think>     yes: the chat template opens it, so R1 may not
    step3            <think> ... </think>     yes
    qwen3-thinking   <think> ... </think>     yes
    qwen3            <think> ... </think>     only when the output holds <think>
    kimi             ◁think▷ ... ◁/think▷     only when the output holds ◁think▷
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasoningFormat:
    start: str
    end: str
    opens_thinking: bool  # the output begins inside the thinking, with or without `start`


_THINK = ("<think>", "</think>")
FORMATS: dict[str, ReasoningFormat] = {
    "deepseek-r1": ReasoningFormat(*_THINK, opens_thinking=True),
    "step3": ReasoningFormat(*_THINK, opens_thinking=True),
    "qwen3-thinking": ReasoningFormat(*_THINK, opens_thinking=True),
    "qwen3": ReasoningFormat(*_THINK, opens_thinking=False),
    "kimi": ReasoningFormat("◁think▷", "◁/think▷", opens_thinking=False),
}


def reasoning_format(model_type: str | None) -> ReasoningFormat:
    key = (model_type or "").lower()
    if key not in FORMATS:
        raise ValueError(
            f"separate_reasoning: model_type must be one of {', '.join(FORMATS)}; "
            f"got {model_type!r}"
        )
    return FORMATS[key]


def split_reasoning(text: str, model_type: str) -> tuple[str, str]:
    """(thinking, answer) of one generated text, each stripped of surrounding whitespace.

    Thinking that never closed (the token limit cut it short) is all thinking: the answer is ""
    rather than half a thought.
    """
    fmt = reasoning_format(model_type)
    if not fmt.opens_thinking and fmt.start not in text:
        return "", text
    body = text.replace(fmt.start, "", 1)
    thinking, closed, answer = body.partition(fmt.end)
    if not closed:
        return body.strip(), ""
    return thinking.strip(), answer.strip()
