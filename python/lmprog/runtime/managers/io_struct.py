"""Plain dataclass messages between the front (LLM / TokenizerManager) and the Scheduler."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lmprog.runtime.sampling.sampling_params import SamplingParams


@dataclass
class TokenizedGenerateReqInput:
    """A validated, tokenized generation request."""

    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    input_text: str | None = None
    arrival_time: float = field(default_factory=time.time)


@dataclass
class FinishReason:
    """Why a sequence ended: 'stop' (EOS, a stop token or a stop string: `matched`), 'length'
    (max_tokens or the context), or 'abort' (with `message`)."""

    kind: str
    matched: int | str | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        assert self.kind in ("stop", "length", "abort"), self.kind
