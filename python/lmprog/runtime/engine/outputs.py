"""What the offline API returns, in vLLM's shapes: RequestOutput -> [CompletionOutput] for
generation; EmbeddingRequestOutput, ClassificationRequestOutput, PoolingRequestOutput (reward)
and ScoringRequestOutput for pooling models."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token; None when not among the top-k
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    # One dict per generated token: the chosen token and the top-k, token id -> Logprob.
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that matched

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) of a request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_in_queue(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    # With SamplingParams.prompt_logprobs: None for the first prompt token, then per token
    # {token id: Logprob} of the prompt token and the top-k.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    error: str | None = field(default=None)


@dataclass
class EmbeddingOutput:
    embedding: list[float]  # normalized when the model's pooling says so

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass
class ClassificationOutput:
    probs: list[float]  # softmax over the labels (one label: its sigmoid)

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ClassificationRequestOutput:
    request_id: str
    outputs: ClassificationOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass
class PoolingOutput:
    """`reward`'s output: the model's raw logits, [num_labels] for a sequence classifier (a
    reward model's one label: `data[0]` is the reward), [tokens, num_labels] per token."""

    data: torch.Tensor


@dataclass
class PoolingRequestOutput:
    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass
class ScoringOutput:
    # An embedder's: cosine similarity of the two texts' embeddings; a cross-encoder's: the
    # sigmoid of its logit for the pair.
    score: float


@dataclass
class ScoringRequestOutput:
    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int]  # an embedder's: the second text's tokens; else the pair's
    finished: bool = True
