"""What a pooling model computes, and so which calls it answers. The architecture decides:

    architecture                          kind            one request's output
    BertModel, or a decoder with          embed           a vector (the sentence-transformers
      runner="pooling" / --is-embedding                     pooling, or the last token, normalized)
    *ForSequenceClassification            classify        num_labels logits
    *ForTokenClassification               token_classify  num_labels logits per prompt token

The calls (offline `LLM` methods; their HTTP routes in CALL_ROUTES) each kind answers:

    embed:           embed; score (cosine of the two embeddings)
    classify:        classify (softmax probs); reward (the raw logits: a reward model has one
                     label, so one scalar); score (a cross-encoder: one label, sigmoid of it)
    token_classify:  reward (raw logits per token)

The model returns raw logits; the activation belongs to the call (`class_probs`, `pair_score`),
so one model serves several calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

POOLING_KINDS = ("embed", "classify", "token_classify")
CALL_ROUTES = {
    "generate": "/generate, /v1/completions and /v1/chat/completions",
    "embed": "/v1/embeddings and /encode",
    "classify": "/classify",
    "score": "/v1/score and /v1/rerank",
    "reward": "/pooling",
}
POOLING_CALLS = ("embed", "classify", "score", "reward")
_CALLS = {
    "embed": ("embed", "score"),
    "classify": ("classify", "score", "reward"),
    "token_classify": ("reward",),
}
# What a call needs, said to whoever asks a model that cannot answer it.
_NEEDS = {
    "generate": "a generation model (a decoder served without runner='pooling')",
    "embed": "an embedding model (an encoder such as all-minilm-l6-v2, or a decoder served "
    "with runner='pooling' / --is-embedding)",
    "classify": "a classification model (*ForSequenceClassification)",
    "score": "an embedding model or a cross-encoder (*ForSequenceClassification with one label)",
    "reward": "a reward model (*ForSequenceClassification or *ForTokenClassification)",
}
_DESCRIPTIONS = {
    "embed": "embedding model",
    "classify": "classification model",
    "token_classify": "token classification (per-token reward) model",
}


@dataclass(frozen=True)
class PoolingTask:
    """A pooling model's kind and, for classifiers, its labels (config.id2label, in order)."""

    kind: str
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        assert self.kind in POOLING_KINDS, f"pooling kind {self.kind!r} not in {POOLING_KINDS}"
        assert (self.kind == "embed") == (not self.labels), "classifiers (only) have labels"

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def per_token(self) -> bool:
        """One output row per prompt token (so every token must be computed: no prefix reuse)."""
        return self.kind == "token_classify"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self.kind]

    def serves(self, call: str) -> bool:
        """Whether this model answers `call`; score on a classifier needs a cross-encoder."""
        if call == "score" and self.kind == "classify":
            return self.num_labels == 1
        return call in _CALLS[self.kind]


def task_of_config(kind: str, config: object) -> PoolingTask:
    """A classifier's task with the labels of its HF config (LABEL_i where it names none)."""
    if kind == "embed":
        return PoolingTask("embed")
    n = int(config.num_labels)
    names = getattr(config, "id2label", None) or {}
    return PoolingTask(kind, tuple(str(names.get(i, f"LABEL_{i}")) for i in range(n)))


def serves(task: PoolingTask | None, call: str) -> bool:
    """Whether a model served for `task` (None: generation) answers `call`."""
    return call == "generate" if task is None else task.serves(call)


def refusal(task: PoolingTask | None, call: str, model: str, routes: bool = False) -> str:
    """Why `model` (served for `task`; None: generation) cannot answer `call`, and what it
    answers instead: its calls, or with `routes` their HTTP routes."""
    if task is None:
        what, served = "a generation model", ["generate"]
    else:
        what = f"{'an' if task.description[0] in 'aeiou' else 'a'} {task.description}"
        served = [c for c in POOLING_CALLS if task.serves(c)]
    if call == "score" and task is not None and task.kind == "classify":
        why = (
            f"score needs a cross-encoder (a classifier with one label); '{model}' has "
            f"{task.num_labels} labels {list(task.labels)}"
        )
    else:
        why = f"'{model}' is {what}: {call} needs {_NEEDS[call]}"
    answers = [CALL_ROUTES[c] for c in served] if routes else [f"{c}()" for c in served]
    return f"{why}; this model answers {', '.join(answers)}"


def class_probs(logits: list[float]) -> list[float]:
    """classify's probabilities: softmax over the labels; with one label, its sigmoid (a
    softmax over one label is always 1)."""
    if len(logits) == 1:
        return [_sigmoid(logits[0])]
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def pair_score(logits: list[float]) -> float:
    """A cross-encoder's relevance score of a pair: the sigmoid of its one logit (as
    sentence-transformers' CrossEncoder and vLLM report it)."""
    assert len(logits) == 1, f"a cross-encoder has one label, not {len(logits)}"
    return _sigmoid(logits[0])


def cosine(x: list[float], y: list[float]) -> float:
    """An embedder's score of a pair: the cosine similarity of their embeddings (0 if one is
    all zeros)."""
    dot = sum(a * b for a, b in zip(x, y))
    norm = math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y))
    return dot / norm if norm else 0.0


def _sigmoid(x: float) -> float:
    # Split by sign so that exp never overflows.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)
