"""A model served as an embedder: its trunk's hidden states, pooled into one vector per
sequence. The trunk is an encoder (BERT) or a decoder's body without its LM head."""

from __future__ import annotations

import torch
from torch import nn

from lmprog.runtime.layers.pooler import Pooler
from lmprog.runtime.model_executor.forward_batch import ForwardBatch
from lmprog.runtime.model_loader.pooling_config import PoolingConfig


class EmbeddingModel(nn.Module):
    """`forward(forward_batch)` -> [B, hidden] float32 embeddings, one per request of the step
    (for a decoder prefilled in chunks, the row of a request whose prompt is not yet complete
    is meaningless and ignored by the scheduler)."""

    def __init__(self, model: nn.Module, pooling: PoolingConfig) -> None:
        super().__init__()
        self.is_encoder = bool(getattr(model, "is_encoder", False))
        if not self.is_encoder and pooling.kind != "last":
            raise ValueError(
                f"a decoder embeds through its last token; this model's sentence-transformers "
                f"files ask for {pooling.kind} pooling, which a causal prefix cache cannot serve"
            )
        # A decoder's body (LlamaForCausalLM.model) returns final-normed hidden states.
        self.trunk = model if self.is_encoder else model.model
        self.pooler = Pooler(pooling)

    def forward(self, forward_batch: ForwardBatch) -> torch.Tensor:
        return self.pooler(self.trunk(forward_batch), forward_batch)
