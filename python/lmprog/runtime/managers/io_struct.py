"""Plain dataclass messages between the front (LLM / TokenizerManager) and the Scheduler.

The server sends them between processes through `codec.py`; the offline `LLM` passes them in
process. API process -> scheduler: TokenizedGenerateReqInput, AbortReq, FlushCacheReq,
GetServerInfoReq. Scheduler -> API process: BatchOutput, RequestError, FlushCacheResult,
ServerInfo, SchedulerReady (once, when the model is loaded).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lmprog.runtime.models.pooling_task import PoolingTask
from lmprog.runtime.sampling.sampling_params import SamplingParams


@dataclass
class TokenizedGenerateReqInput:
    """A validated, tokenized generation request."""

    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    input_text: str | None = None
    arrival_time: float = field(default_factory=time.time)
    stream: bool = False  # report every new token (else only the finished sequence)
    prefill_only: bool = False  # compute (and cache) the prompt, generate nothing
    # With sampling_params.prompt_logprobs: the first prompt position whose logprob is
    # returned (SGLang's logprob_start_len; clipped to the prompt length).
    logprob_start_len: int = 0
    # A cross-encoder's segment ids (0 for the first text of a pair, 1 for the second), one
    # per input id; None: all 0. Only encoders (BERT) read them.
    token_type_ids: list[int] | None = None


@dataclass
class FinishReason:
    """Why a sequence ended: 'stop' (EOS, a stop token or a stop string: `matched`; or its
    grammar completed), 'length' (max_tokens or the context), 'abort' (with `message`), or
    'error' (with `message`): refused after it was queued (its grammar does not compile), or,
    with `internal`, failed by a fault of the engine while it ran (the server answers 500 and
    keeps serving the other requests)."""

    kind: str
    matched: int | str | None = None
    message: str | None = None
    internal: bool = False

    def __post_init__(self) -> None:
        assert self.kind in ("stop", "length", "abort", "error"), self.kind


def internal_error(error: BaseException) -> FinishReason:
    """How a sequence ends when the engine fails while running it."""
    message = f"internal error while running the request: {type(error).__name__}: {error}"
    return FinishReason("error", message=message, internal=True)


@dataclass
class AbortReq:
    rid: str


@dataclass
class FlushCacheReq:
    pass


@dataclass
class FlushCacheResult:
    success: bool


@dataclass
class GetServerInfoReq:
    cache_tree: bool = False  # also the prefix cache's top levels (the dashboard's view)


@dataclass
class ServerInfo:
    kv: dict[str, int]  # Scheduler.kv_stats()
    stats: dict[str, float]  # SchedulerStats counters
    cache_tree: dict | None = None  # mem_cache/tree_view.py, when asked for


@dataclass
class RequestError:
    """The scheduler refused a request (a validation error the API process could not see:
    status 400) or failed it (an internal error while it ran: status 500)."""

    rid: str
    message: str
    status: int = 400


@dataclass
class Latencies:
    """A finished sequence's timings, in seconds."""

    ttft: float  # arrival to the first token
    e2e: float  # arrival to the end
    gaps: list[float]  # between consecutive tokens (one fewer than the tokens)


@dataclass
class SeqOutput:
    """What one sequence gained since its last report (only text that is safe to stream)."""

    rid: str
    index: int
    token_ids: list[int]
    text: str
    # Per new token: (chosen logprob, {token_id: logprob} of the top-k), when asked for.
    logprobs: list[tuple[float, dict[int, float]]] | None
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    # When finished (and it produced a token): how long it took.
    latencies: Latencies | None = None
    # Prompt-token logprobs from logprob_start_len on, in the sequence's first report:
    # (logprob given the tokens before, or None at position 0; {token_id: logprob} top-k).
    input_logprobs: list[tuple[float | None, dict[int, float]]] | None = None
    # A pooling model's output (see models/pooling_task.py): an embedding or a classifier's
    # raw logits (list[float]), or a token classifier's logits per token (list[list[float]]).
    pooled: list | None = None


@dataclass
class BatchOutput:
    outputs: list[SeqOutput]


@dataclass
class SchedulerReady:
    """Sent once the model is loaded: what the API process needs to validate and describe."""

    model_path: str
    context_len: int
    vocab_size: int
    max_total_tokens: int
    device: str
    dtype: str
    is_embedding: bool = False  # a pooling model (pooling_task says which), not generation
    embedding_dim: int | None = None  # an embedder's vector size
    pooling_task: PoolingTask | None = None
    attention_backend: str = ""  # the backend `auto` (or the flag) resolved to
    cpu_path: str = "torch"  # sgl_kernel's ISA (amx, avx512, avx2, scalar) or torch
    eos_token_ids: tuple[int, ...] = ()  # the tokens that end a sequence (beam search's too)
