"""How `select` picks a choice from the model's logprobs of each choice's tokens.

A method is called with, per choice, `input_token_logprobs`: [logprob, token_id, text] of the
choice's tokens (the scored part of the prompt), `normalized_prompt_logprobs`: their mean, and,
when the method asks for them, `unconditional_token_logprobs`: the same tokens scored without
the context. It returns a ChoicesDecision. Methods keep SGLang's names and signature, so custom
ones written for it work here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ChoicesDecision:
    decision: str
    meta_info: dict[str, Any] = field(default_factory=dict)


class ChoicesSamplingMethod(ABC):
    @property
    def requires_unconditional_logprobs(self) -> bool:
        return False

    @abstractmethod
    def __call__(
        self,
        *,
        choices: list[str],
        normalized_prompt_logprobs: list[float],
        input_token_logprobs: list[list[Any]],
        output_token_logprobs: list[list[Any]],
        unconditional_token_logprobs: list[list[Any]] | None = None,
    ) -> ChoicesDecision: ...


def mean_logprob(entries: list[Any]) -> float:
    """The mean logprob of [logprob, token_id, text] entries (None entries skipped)."""
    return _mean(_values(entries))


def _values(entries: list[Any]) -> list[float]:
    return [e[0] for e in entries if e[0] is not None]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("-inf")


class TokenLengthNormalized(ChoicesSamplingMethod):
    """The choice whose tokens have the highest mean logprob (the default)."""

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, **_):
        best = max(range(len(choices)), key=lambda i: normalized_prompt_logprobs[i])
        meta = {
            "normalized_prompt_logprobs": normalized_prompt_logprobs,
            "input_token_logprobs": input_token_logprobs,
        }
        return ChoicesDecision(choices[best], meta)


class GreedyTokenSelection(ChoicesSamplingMethod):
    """Position by position, keep the choices whose token there has the best logprob; a choice
    that has run out of tokens counts with its own mean. Ties left at the end: the first."""

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, **_):
        rows = [_values(entries) for entries in input_token_logprobs]
        width = max(len(r) for r in rows)
        padded = [r + [_mean(r)] * (width - len(r)) for r in rows]
        alive = list(range(len(choices)))
        for pos in range(width):
            best = max(padded[i][pos] for i in alive)
            alive = [i for i in alive if padded[i][pos] == best]
            if len(alive) == 1:
                break
        meta = {
            "normalized_prompt_logprobs": normalized_prompt_logprobs,
            "input_token_logprobs": input_token_logprobs,
            "greedy_logprob_matrix": padded,
        }
        return ChoicesDecision(choices[alive[0]], meta)


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """The choice whose tokens gain the most from the context: the mean of (logprob with the
    context - logprob without it)."""

    @property
    def requires_unconditional_logprobs(self) -> bool:
        return True

    def __call__(
        self,
        *,
        choices,
        normalized_prompt_logprobs,
        input_token_logprobs,
        unconditional_token_logprobs=None,
        **_,
    ):
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs unconditional logprobs")
        scores = []
        for cond, uncond in zip(input_token_logprobs, unconditional_token_logprobs):
            # Aligned from the end: a token without a context-free score (a choice's first
            # token scored from nothing) counts with its conditional logprob alone.
            pairs = list(zip(reversed(cond), reversed(uncond)))
            scores.append(_mean([c[0] - (u[0] or 0.0) for c, u in pairs if c[0] is not None]))
        best = max(range(len(choices)), key=lambda i: scores[i])
        meta = {
            "normalized_prompt_logprobs": normalized_prompt_logprobs,
            "input_token_logprobs": input_token_logprobs,
            "unconditional_token_logprobs": unconditional_token_logprobs,
            "normalized_unconditional_prompt_logprobs": scores,
        }
        return ChoicesDecision(choices[best], meta)


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
