"""Beam search, as vLLM runs it: outside the engine, over one-token generations.

Each step asks the engine for one token of every live beam, with the top `2 * beam_width`
logprobs of its next position; the candidates (beam + token) of all beams are ranked by
cumulative logprob and the best `beam_width` go on. A candidate ending in EOS (unless
`ignore_eos`) is complete and leaves the running set. After `max_tokens` steps (or when no beam
runs), the complete and the running beams are ranked by their length-penalized score,
`cum_logprob / generated_len ** length_penalty` (HF transformers' definition, the generated
tokens only; EOS counts as generated), and the best `beam_width` are returned, best first.

Why this costs no copies: a beam's next step is a prompt that extends its previous one by one
token, so the prefix cache holds every beam's tokens after the first step. Beams that share a
history share its KV slots in the radix tree (a fork in the tree where they part), each step
computes one new token per beam, and a beam that drops out of the best leaves only evictable
cache behind.

`BeamSearch` is the state of one prompt's search, independent of what runs the steps: the
offline `LLM.beam_search` drives it with the engine, the server's `/generate` with
`use_beam_search` through its tokenizer manager.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from lmprog.runtime.sampling.param_error import ParamError


@dataclass
class BeamSearchParams:
    """vLLM's `BeamSearchParams`. `temperature` is accepted for its API and has no effect:
    candidates are ranked by the model's raw logprobs."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        for name, low in (("beam_width", 1), ("max_tokens", 1)):
            value = getattr(self, name)
            if type(value) is not int or value < low:
                raise ParamError(f"{name} must be an integer >= {low}, got {value!r}", name)
        if self.temperature < 0:
            raise ParamError(f"temperature must be >= 0, got {self.temperature}", "temperature")


@dataclass
class BeamSearchSequence:
    """One beam: `tokens` are the prompt's and the generated ones; `logprobs` has, per generated
    token, the candidates of its step as {token_id: logprob}; `text` (set when the search ends)
    is the generated text, without a final EOS."""

    tokens: list[int]
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (ended in EOS) or "length"
    stop_reason: int | None = None  # the EOS token it ended with


@dataclass
class BeamSearchOutput:
    """The best beams of one prompt, best first."""

    sequences: list[BeamSearchSequence]


class BeamSearch:
    """One prompt's search. Per step: `prompts()` are the token ids to generate one token for,
    `advance()` takes each one's candidates, until `done`; then `result()`."""

    def __init__(
        self, prompt_ids: list[int], params: BeamSearchParams, eos_token_ids: Iterable[int]
    ) -> None:
        self.params = params
        self.prompt_len = len(prompt_ids)
        self.eos = frozenset(eos_token_ids)
        self.running = [BeamSearchSequence(list(prompt_ids))]
        self.complete: list[BeamSearchSequence] = []
        self.steps = 0

    @property
    def candidates_per_beam(self) -> int:
        """How many top logprobs each step needs per beam: enough that, with EOS candidates
        set aside, `beam_width` running ones remain."""
        return 2 * self.params.beam_width

    @property
    def done(self) -> bool:
        return self.steps >= self.params.max_tokens or not self.running

    def prompts(self) -> list[list[int]]:
        return [beam.tokens for beam in self.running]

    def advance(self, candidates: list[dict[int, float]]) -> None:
        """Extends the running beams by one token: `candidates[i]` is beam i's top
        {token_id: logprob} for its next token."""
        assert len(candidates) == len(self.running), "one candidate set per running beam"
        grown = []
        for beam, top in zip(self.running, candidates):
            for token, logprob in top.items():
                seq = BeamSearchSequence(
                    beam.tokens + [token], beam.logprobs + [top], beam.cum_logprob + logprob
                )
                if token in self.eos and not self.params.ignore_eos:
                    seq.finish_reason, seq.stop_reason = "stop", token
                    self.complete.append(seq)
                else:
                    grown.append(seq)
        grown.sort(key=lambda s: s.cum_logprob, reverse=True)
        self.running = grown[: self.params.beam_width]
        self.steps += 1

    def score(self, seq: BeamSearchSequence) -> float:
        generated = max(1, len(seq.tokens) - self.prompt_len)
        return seq.cum_logprob / generated**self.params.length_penalty

    def result(self, decode) -> BeamSearchOutput:
        """The best `beam_width` beams, best first, their texts decoded with `decode(ids)`."""
        for seq in self.running:
            seq.finish_reason = "length"
        ranked = sorted(self.complete + self.running, key=self.score, reverse=True)
        best = ranked[: self.params.beam_width]
        for seq in best:
            generated = seq.tokens[self.prompt_len :]
            if seq.finish_reason == "stop" and not self.params.include_stop_str_in_output:
                generated = generated[:-1]
            seq.text = decode(generated)
        return BeamSearchOutput(best)
