"""OpenAI: programs against an OpenAI-compatible API (OpenAI's own, or lmprog's /v1 routes).

Chat models (chat.completions) see a program as messages: role prefixes and suffixes are empty,
so a turn's text is just its content, and a gen sends `executor.messages_` (the closed turns).
The chat API cannot continue a turn that already has text, so without speculative execution a
gen must open its assistant turn. Completion models (completions) continue `executor.text_`,
with roles rendered by a plain-text template.

`select` on a completion model scores each choice from its tokens' logprobs (prompt scoring:
`echo`, `logprobs`, `max_tokens=0`); on a chat model it asks the model (see `_ask`).

API speculative execution (`@function(num_api_spec_tokens=K)`) saves calls by generating ahead;
see speculation.py.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai

from lmprog.lang.backend.base import BaseBackend
from lmprog.lang.backend.speculation import Speculation, ahead, decides, speculates, take
from lmprog.lang.chat_template import PLAIN, ROLES, ChatTemplate
from lmprog.lang.choices import ChoicesDecision, ChoicesSamplingMethod, mean_logprob
from lmprog.lang.ir import GenParams

# OpenAI's completion-only models; every other name is taken to be a chat model. Open models
# named "...-instruct" are usually chat models too: pass is_chat_model to choose.
COMPLETION_MODELS = ("gpt-3.5-turbo-instruct", "babbage-002", "davinci-002")
# A chat model's turns are messages: their text in the program is just their content.
MESSAGES = ChatTemplate("openai-chat", {role: ("", "") for role in ROLES})


def is_completion_model(model_name: str) -> bool:
    return model_name.split("/")[-1].startswith(COMPLETION_MODELS)


@dataclass
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def reset(self) -> None:
        self.prompt_tokens = self.completion_tokens = 0


class OpenAI(BaseBackend):
    def __init__(
        self,
        model_name: str,
        base_url: str | None = None,
        api_key: str | None = None,
        is_chat_model: bool | None = None,
        chat_template: ChatTemplate | None = None,
        is_azure: bool = False,
        **client_kwargs: Any,
    ) -> None:
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or ("EMPTY" if base_url else None)
        client_cls = openai.AzureOpenAI if is_azure else openai.OpenAI
        self.client = client_cls(base_url=base_url, api_key=api_key, **client_kwargs)
        self.model_name = model_name
        if is_chat_model is None:
            is_chat_model = not is_completion_model(model_name)
        self.is_chat_model = is_chat_model
        self.chat_template = chat_template or (MESSAGES if is_chat_model else PLAIN)
        self.token_usage = TokenUsage()
        self.num_calls = 0  # every API call, including failed ones
        self._lock = threading.Lock()  # run_batch calls from many threads

    def get_model_name(self) -> str:
        return self.model_name

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    def shutdown(self) -> None:
        self.client.close()

    # ---- generation -------------------------------------------------------------------------
    def generate(self, executor: Any, params: GenParams) -> tuple[str, dict]:
        if speculates(executor, params):
            return self._generate_spec(executor, params)
        if self.is_chat_model:
            return self._chat(_messages(executor), params)
        return self._complete(executor.text_, params)

    def generate_stream(self, executor: Any, params: GenParams) -> Iterator[tuple[str, dict]]:
        if speculates(executor, params):
            yield self._generate_spec(executor, params)
            return
        kwargs = self._kwargs(params, logprobs=False) | {
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.is_chat_model:
            messages = _messages(executor)
            events = _chat_events(
                self._call(self.client.chat.completions, messages=messages, **kwargs)
            )
        else:
            prompt = executor.text_
            events = _completion_events(
                self._call(self.client.completions, prompt=prompt, **kwargs)
            )
        yield from self._pieces(events)

    def role_end(self, executor: Any, role: str) -> None:
        """A chat model's speculated reply answers one assistant turn only."""
        if self.is_chat_model and role == "assistant":
            executor.spec = None

    def _chat(self, messages: list[dict], params: GenParams) -> tuple[str, dict]:
        r = self._call(self.client.chat.completions, messages=messages, **self._kwargs(params))
        choice = r.choices[0]
        meta = self._meta(r, choice.finish_reason)
        if choice.logprobs is not None and choice.logprobs.content is not None:
            meta["output_token_logprobs"] = [
                [t.logprob, None, t.token] for t in choice.logprobs.content
            ]
        return choice.message.content or "", meta

    def _complete(self, prompt: str, params: GenParams) -> tuple[str, dict]:
        r = self._call(self.client.completions, prompt=prompt, **self._kwargs(params))
        choice = r.choices[0]
        meta = self._meta(r, choice.finish_reason)
        if choice.logprobs is not None:
            lp = choice.logprobs
            meta["output_token_logprobs"] = [
                [v, None, t] for v, t in zip(lp.token_logprobs, lp.tokens)
            ]
        return choice.text, meta

    # ---- speculative execution --------------------------------------------------------------
    def _generate_spec(self, executor: Any, params: GenParams) -> tuple[str, dict]:
        """The gen's value from the speculated text, making a fresh call when that text cannot
        decide it (the program diverged, or it ends before the gen would)."""
        spec: Speculation | None = executor.spec
        rest = spec.rest(executor.text_) if spec is not None else None
        from_pending = rest is not None and decides(rest, params, spec.finished)
        if not from_pending:
            spec = executor.spec = self._speculate(executor, params)
            rest = spec.rest(executor.text_)
        return take(rest, params), {**spec.meta, "from_pending": from_pending}

    def _speculate(self, executor: Any, params: GenParams) -> Speculation:
        params = ahead(params, executor.num_api_spec_tokens)
        if not self.is_chat_model:
            text, meta = self._complete(executor.text_, params)
            return Speculation(executor.text_ + text, meta["finish_reason"] == "stop", meta)
        _check_turn(executor)
        reply, meta = self._chat(list(executor.messages_), params)
        turn = executor.open_turn_text
        before = executor.text_[: len(executor.text_) - len(turn)]
        # The reply answers the whole turn: it either repeats the turn's text so far or goes on
        # from it.
        base = before if reply.startswith(turn) else executor.text_
        return Speculation(base + reply, meta["finish_reason"] == "stop", meta)

    # ---- select -----------------------------------------------------------------------------
    def select(
        self,
        executor: Any,
        choices: list[str],
        temperature: float,
        method: ChoicesSamplingMethod,
    ) -> ChoicesDecision:
        """Completion models: `method` over the choices' token logprobs (temperature is not
        used: the choice is the method's). Chat models: the model is asked (see `_ask`)."""
        if self.is_chat_model:
            return self._ask(executor, choices, temperature)
        token_logprobs = self._score([executor.text_ + c for c in choices], len(executor.text_))
        normalized = [mean_logprob(row) for row in token_logprobs]
        unconditional = None
        if method.requires_unconditional_logprobs:
            unconditional = self._score(choices, 0)
        return method(
            choices=choices,
            normalized_prompt_logprobs=normalized,
            input_token_logprobs=token_logprobs,
            output_token_logprobs=[[] for _ in choices],
            unconditional_token_logprobs=unconditional,
        )

    def _score(self, prompts: list[str], start: int) -> list[list[list[Any]]]:
        """Per prompt, [logprob, None, text] of its tokens that end after character `start`.

        NOTE: a token that straddles `start` counts as the choice's: joined with a choice, the
        prefix's last characters can merge into its first token (" " + "Blue" -> " Blue").
        """
        r = self._call(
            self.client.completions,
            model=self.model_name,
            prompt=prompts,
            echo=True,
            logprobs=1,
            max_tokens=0,
            temperature=0,
        )
        rows = []
        for choice in sorted(r.choices, key=lambda c: c.index):
            lp = choice.logprobs
            rows.append(
                [
                    [value, None, token]
                    for token, value, offset in zip(lp.tokens, lp.token_logprobs, lp.text_offset)
                    if offset + len(token) > start
                ]
            )
        return rows

    def _ask(self, executor: Any, choices: list[str], temperature: float) -> ChoicesDecision:
        """A chat model's select: one call asking for exactly one of the choices, listed one a
        line after the last user message. The pick: the longest choice the answer starts with,
        else the choice the answer mentions first, else the first choice (case-insensitive)."""
        question = "Answer with exactly one of the following, and nothing else:\n" + "\n".join(
            choices
        )
        messages = _with_question(_messages(executor), question)
        params = GenParams(max_tokens=max(len(c) for c in choices) + 16, temperature=temperature)
        answer, meta = self._chat(messages, params)
        return ChoicesDecision(_match(answer, choices), {**meta, "answer": answer})

    # ---- API calls --------------------------------------------------------------------------
    def _kwargs(self, params: GenParams, logprobs: bool = True) -> dict[str, Any]:
        """GenParams -> create() keywords; parameters beyond OpenAI's go in extra_body, and only
        when they differ from their neutral value (OpenAI rejects unknown parameters)."""
        kwargs = {
            "model": self.model_name,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stop": params.stops or None,
            "frequency_penalty": params.frequency_penalty,
            "presence_penalty": params.presence_penalty,
        }
        extra = {
            "regex": params.effective_regex,
            "top_k": params.top_k if params.top_k not in (None, -1, 0) else None,
            "min_p": params.min_p or None,
            "min_tokens": params.min_tokens or None,
            "ignore_eos": params.ignore_eos or None,
            "stop_token_ids": params.stop_token_ids or None,
        }
        schema = params.json_schema
        if schema is not None:
            schema = json.loads(schema) if isinstance(schema, str) else schema
            fmt = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
            # The completions API has no response_format; lmprog's server reads it from the body.
            (kwargs if self.is_chat_model else extra)["response_format"] = fmt
        if logprobs and params.return_logprob:
            if self.is_chat_model:
                kwargs |= {"logprobs": True, "top_logprobs": params.top_logprobs_num}
            else:
                kwargs["logprobs"] = params.top_logprobs_num or 0
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        extra = {k: v for k, v in extra.items() if v is not None}
        return kwargs | ({"extra_body": extra} if extra else {})

    def _call(self, api: Any, **kwargs: Any) -> Any:
        """api.create(**kwargs), counted; errors (openai.APIError and its kinds) propagate with
        the server's message. A non-streamed reply's usage is counted here too."""
        with self._lock:
            self.num_calls += 1
        r = api.create(**kwargs)
        if not kwargs.get("stream"):
            self._count(r.usage)
        return r

    def _count(self, usage: Any) -> None:
        if usage is None:
            return
        with self._lock:
            self.token_usage.prompt_tokens += usage.prompt_tokens
            self.token_usage.completion_tokens += usage.completion_tokens

    def _meta(self, r: Any, finish_reason: str | None) -> dict:
        usage = r.usage
        return {
            "id": r.id,
            "finish_reason": finish_reason,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
        }

    def _pieces(self, events: Iterator[tuple[str, Any, Any]]) -> Iterator[tuple[str, dict]]:
        """(piece, meta) from a stream's (text, finish_reason, usage) events. A piece is held
        back one event so that the last one carries the final meta (finish reason, usage),
        which is what the executor records."""
        meta: dict = {}
        held: str | None = None
        for text, finish_reason, usage in events:
            if finish_reason is not None:
                meta["finish_reason"] = finish_reason
            if usage is not None:
                self._count(usage)
                meta |= {
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                }
            if text:
                if held is not None:
                    yield held, dict(meta)
                held = text
        yield held or "", dict(meta)


# ---- helpers ----------------------------------------------------------------------------------
def _check_turn(executor: Any) -> None:
    if executor.cur_role != "assistant":
        where = f"a {executor.cur_role} turn" if executor.cur_role else "no turn"
        raise ValueError(
            f"a chat model generates only inside an assistant turn; this gen is in {where} "
            "(use assistant(gen(...)), or is_chat_model=False for a completion model)"
        )


def _messages(executor: Any) -> list[dict[str, str]]:
    """The closed turns, for a chat call made at the start of an assistant turn."""
    _check_turn(executor)
    turn = executor.open_turn_text
    if turn:
        raise ValueError(
            "chat models only support gen/select at the start of an assistant turn; this turn "
            f"already has {turn[:60]!r} (the chat API cannot continue it). With "
            "@function(num_api_spec_tokens=...) one call answers the whole turn."
        )
    return list(executor.messages_)


def _with_question(messages: list[dict[str, str]], question: str) -> list[dict[str, str]]:
    if messages and messages[-1]["role"] == "user":
        last = messages[-1]
        return [*messages[:-1], {**last, "content": f"{last['content']}\n\n{question}"}]
    return [*messages, {"role": "user", "content": question}]


def _match(answer: str, choices: list[str]) -> str:
    said = answer.strip().lower()
    named = [c for c in choices if c.strip()]
    starts = [c for c in named if said.startswith(c.strip().lower())]
    if starts:
        return max(starts, key=len)
    mentioned = [c for c in named if c.strip().lower() in said]
    if mentioned:
        return min(mentioned, key=lambda c: said.index(c.strip().lower()))
    return choices[0]


def _chat_events(stream: Any) -> Iterator[tuple[str, Any, Any]]:
    """(text, finish_reason, usage) of a streamed chat completion; usage comes last, alone."""
    for chunk in stream:
        for c in chunk.choices:
            yield c.delta.content or "", c.finish_reason, None
        if chunk.usage is not None:
            yield "", None, chunk.usage


def _completion_events(stream: Any) -> Iterator[tuple[str, Any, Any]]:
    for chunk in stream:
        for c in chunk.choices:
            yield c.text, c.finish_reason, None
        if chunk.usage is not None:
            yield "", None, chunk.usage
