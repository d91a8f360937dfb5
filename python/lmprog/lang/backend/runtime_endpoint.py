"""RuntimeEndpoint: programs against an lmprog server's native API (/generate).

Every gen continues the program's whole text; the server's radix cache makes that cheap, since
the text before it was computed by the previous call. `select` scores all choices in one
batched prefill-only call from prompt-token logprobs.
"""

from __future__ import annotations

import json
import math
import random
import threading
from collections.abc import Iterator
from typing import Any

import requests

from lmprog.lang.backend.base import BaseBackend
from lmprog.lang.chat_template import CHATML, PLAIN, ChatTemplate
from lmprog.lang.choices import ChoicesDecision, ChoicesSamplingMethod, mean_logprob
from lmprog.lang.ir import GenParams

TEMPLATES = {"chatml": CHATML, "plain": PLAIN}
TIMEOUT = 600


def native_sampling_params(params: GenParams) -> dict[str, Any]:
    """GenParams -> /generate's sampling_params (SGLang's names); unset values left out."""
    schema = params.json_schema
    values = {
        "max_new_tokens": params.max_tokens,
        "min_new_tokens": params.min_tokens,
        "stop": params.stops or None,
        "stop_token_ids": params.stop_token_ids,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "min_p": params.min_p,
        "frequency_penalty": params.frequency_penalty,
        "presence_penalty": params.presence_penalty,
        "ignore_eos": params.ignore_eos,
        "regex": params.effective_regex,
        "json_schema": json.dumps(schema) if isinstance(schema, dict) else schema,
    }
    return {k: v for k, v in values.items() if v is not None}


def _logprob_fields(params: GenParams) -> dict[str, Any]:
    values = {
        "return_logprob": params.return_logprob,
        "logprob_start_len": params.logprob_start_len,
        "top_logprobs_num": params.top_logprobs_num,
        "return_text_in_logprobs": params.return_text_in_logprobs,
    }
    return {k: v for k, v in values.items() if v is not None}


class RuntimeEndpoint(BaseBackend):
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        verify: Any = None,
        chat_template_name: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.verify = verify
        self._local = threading.local()  # one requests.Session per thread
        self.model_info = self._get("/get_model_info")
        if chat_template_name is not None:
            if chat_template_name not in TEMPLATES:
                raise ValueError(
                    f"chat_template_name must be one of {sorted(TEMPLATES)}, got {chat_template_name!r}"
                )
            self.chat_template = TEMPLATES[chat_template_name]
        elif self.model_info.get("chat_template"):
            self.chat_template = ChatTemplate.from_dict(self.model_info["chat_template"])
        else:
            self.chat_template = PLAIN

    # ---- info and control -------------------------------------------------------------------
    def get_model_name(self) -> str:
        return self.model_info["model_path"]

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    def flush_cache(self) -> bool:
        return bool(self._post("/flush_cache", {}, ok=(200, 409)).get("success"))

    def get_server_info(self) -> dict:
        return self._get("/get_server_info")

    def cache_prefix(self, prefix: str) -> None:
        """Prefills `prefix` (nothing generated), so later requests find it cached."""
        self._post("/generate", {"text": prefix, "sampling_params": {"max_new_tokens": 0}})

    def fork_prefill(self, executor: Any) -> None:
        if executor.text_:
            self.cache_prefix(executor.text_)

    # ---- generation -------------------------------------------------------------------------
    def generate(self, executor: Any, params: GenParams) -> tuple[str, dict]:
        body = {
            "text": executor.text_,
            "sampling_params": native_sampling_params(params),
            **_logprob_fields(params),
        }
        out = self._post("/generate", body)
        return out["text"], out["meta_info"]

    def generate_stream(self, executor: Any, params: GenParams) -> Iterator[tuple[str, dict]]:
        body = {
            "text": executor.text_,
            "sampling_params": native_sampling_params(params),
            "stream": True,
            **_logprob_fields(params),
        }
        sent = 0
        with self._session().post(
            f"{self.base_url}/generate",
            json=body,
            headers=self._headers(),
            stream=True,
            timeout=TIMEOUT,
            verify=self.verify,
        ) as r:
            _check(r)
            for line in r.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"lmprog server: {event['error'].get('message')}")
                text = event["text"]  # cumulative
                yield text[sent:], event["meta_info"]
                sent = len(text)

    def select(
        self,
        executor: Any,
        choices: list[str],
        temperature: float,
        method: ChoicesSamplingMethod,
    ) -> ChoicesDecision:
        """Scores every choice as a continuation of the program's text.

        The prefix is prefilled first (its token count is the scoring start). Scoring begins at
        the prefix's last token: joined with a choice, that boundary token can retokenize (" " +
        "Blue" -> " Blue"); when it did not, it belongs to the prefix and is dropped.
        """
        prefix = executor.text_
        head = self._post("/generate", {"text": prefix, "sampling_params": {"max_new_tokens": 0}})
        start = max(head["meta_info"]["prompt_tokens"] - 1, 0)
        scored = self._post(
            "/generate",
            {
                "text": [prefix + c for c in choices],
                "sampling_params": {"max_new_tokens": 0, "temperature": 0},
                "return_logprob": True,
                "return_text_in_logprobs": True,
                "logprob_start_len": start,
            },
        )
        token_logprobs, boundaries = [], []
        for item in scored:
            entries = item["meta_info"]["input_token_logprobs"]
            boundary = None
            if start > 0 and len(entries) > 1 and prefix.endswith(entries[0][2] or "\0"):
                # The boundary token did not retokenize: it is the prefix's, not the choice's.
                boundary, entries = entries[0][1], entries[1:]
            token_logprobs.append(entries)
            boundaries.append(boundary)
        normalized = [mean_logprob(entries) for entries in token_logprobs]
        unconditional = None
        if method.requires_unconditional_logprobs:
            unconditional = self._unconditional(token_logprobs, boundaries)
        decision = method(
            choices=choices,
            normalized_prompt_logprobs=normalized,
            input_token_logprobs=token_logprobs,
            output_token_logprobs=[[] for _ in choices],
            unconditional_token_logprobs=unconditional,
        )
        if temperature > 1e-5:
            decision = ChoicesDecision(
                _sample(choices, normalized, temperature), decision.meta_info
            )
        return decision

    def _unconditional(self, token_logprobs: list, boundaries: list) -> list[list]:
        """Each choice's tokens scored without the program's context: after just the boundary
        token when there is one (so every choice token has a score), else from the start (the
        first token then has none)."""
        ids = [
            ([b] if b is not None else []) + [e[1] for e in entries]
            for entries, b in zip(token_logprobs, boundaries)
        ]
        out = self._post(
            "/generate",
            {
                "input_ids": ids,
                "sampling_params": {"max_new_tokens": 0},
                "return_logprob": True,
                "logprob_start_len": 0,
            },
        )
        scored = [item["meta_info"]["input_token_logprobs"] for item in out]
        return [s[1:] if b is not None else s for s, b in zip(scored, boundaries)]

    # ---- HTTP -------------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _get(self, route: str) -> Any:
        r = self._session().get(
            f"{self.base_url}{route}", headers=self._headers(), timeout=TIMEOUT, verify=self.verify
        )
        _check(r)
        return r.json()

    def _post(self, route: str, body: dict, ok: tuple[int, ...] = (200,)) -> Any:
        r = self._session().post(
            f"{self.base_url}{route}",
            json=body,
            headers=self._headers(),
            timeout=TIMEOUT,
            verify=self.verify,
        )
        _check(r, ok)
        return r.json()


def _check(r: requests.Response, ok: tuple[int, ...] = (200,)) -> None:
    if r.status_code in ok:
        return
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = r.text
    raise RuntimeError(f"lmprog server answered {r.status_code}: {message}")


def _sample(choices: list[str], scores: list[float], temperature: float) -> str:
    """A choice drawn with probability proportional to exp(score / temperature)."""
    top = max(scores)
    weights = [math.exp((s - top) / temperature) for s in scores]
    return random.choices(choices, weights)[0]
