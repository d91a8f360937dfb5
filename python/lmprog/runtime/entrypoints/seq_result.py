"""One sequence of a request as the HTTP routes accumulate it from the scheduler's reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmprog.runtime.managers.io_struct import SeqOutput


@dataclass
class SeqResult:
    """One sequence of a request, accumulated from its reports."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)
    input_logprobs: list[tuple[float | None, dict[int, float]]] = field(default_factory=list)
    last: SeqOutput | None = None

    def add(self, out: SeqOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.input_logprobs += out.input_logprobs or []
        self.last = out


def finish_reason_json(out: SeqOutput | None) -> dict | None:
    if out is None or out.finish_reason is None:
        return None
    reason = out.finish_reason
    body: dict[str, Any] = {"type": reason.kind}
    if reason.matched is not None:
        body["matched"] = reason.matched
    if reason.message is not None:
        body["message"] = reason.message
    return body
