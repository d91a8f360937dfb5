"""A model served for pooling: its trunk's hidden states, pooled, through its head.

    trunk(forward_batch) -> [T, hidden]   an encoder (BERT) or a decoder's body (no LM head)
    pooler               -> [B, hidden]   one row per request (all: [T, hidden], one per token)
    head                 -> [B, out]      float32: an embedding, or a classifier's raw logits

Embedders have no head (normalization is the pooler's); classifiers (`*ForSequenceClassification`,
`*ForTokenClassification`) bring their trunk, their head and how they pool.
"""

from __future__ import annotations

import torch
from torch import nn

from lmprog.runtime.layers.pooler import Pooler
from lmprog.runtime.model_executor.forward_batch import ForwardBatch
from lmprog.runtime.model_loader.pooling_config import PoolingConfig
from lmprog.runtime.models.pooling_task import PoolingTask, task_of_config


class PoolingModel(nn.Module):
    """`forward(forward_batch)` -> float32 rows: [B, out] for one output per request, [T, out]
    for per-token tasks. For a decoder prefilled in chunks, a request's row before its last chunk
    is meaningless (per-token rows are its chunk's tokens): the scheduler knows which to keep."""

    def __init__(
        self, trunk: nn.Module, pooling: PoolingConfig, head: nn.Module | None, task: PoolingTask
    ) -> None:
        super().__init__()
        self.is_encoder = bool(getattr(trunk, "is_encoder", False))
        if not self.is_encoder and pooling.kind not in ("last", "all"):
            raise ValueError(
                f"a decoder pools its last token (or every token); this model asks for "
                f"{pooling.kind} pooling, which a causal prefix cache cannot serve"
            )
        self.trunk = trunk
        self.pooler = Pooler(pooling)
        self.head = head
        self.task = task
        self.trailing_pad: int | None = None  # see pooled_input

    @classmethod
    def embedder(cls, model: nn.Module, pooling: PoolingConfig) -> PoolingModel:
        """An encoder, or a causal LM's body (LlamaForCausalLM.model: final-normed states)."""
        trunk = model if getattr(model, "is_encoder", False) else model.model
        return cls(trunk, pooling, None, PoolingTask("embed"))

    @classmethod
    def classifier(cls, model: nn.Module) -> PoolingModel:
        """A `*For{Sequence,Token}Classification` model: its `trunk`, `head`, `pooling` and
        `task` attributes say how it runs."""
        task = task_of_config(model.task, model.config)
        pooling = PoolingConfig(model.pooling, normalize=False)
        pooled = cls(model.trunk, pooling, model.head, task)
        if model.pooling == "last":
            pooled.trailing_pad = getattr(model.config, "pad_token_id", None)
        return pooled

    def pooled_input(self, input_ids: list[int]) -> list[int]:
        """The tokens to compute. A last-token classifier drops trailing pad tokens: HF
        classifies from the rightmost token that is not `pad_token_id` (the first if all
        are), and attention is causal, so that token's state is the same without the pads."""
        end = len(input_ids)
        if self.trailing_pad is not None:
            while end > 1 and input_ids[end - 1] == self.trailing_pad:
                end -= 1
        return input_ids[:end]

    def forward(self, forward_batch: ForwardBatch) -> torch.Tensor:
        pooled = self.pooler(self.trunk(forward_batch), forward_batch)
        return (pooled if self.head is None else self.head(pooled)).float()
