"""Llama-family classifiers, as HF's generic `*ForSequenceClassification` and
`*ForTokenClassification` build them: the decoder body (`model.*`) and a linear head `score`.

    sequence:  logits = score(final hidden state of the last non-pad token)   (no bias)
    token:     logits = score(final hidden state of every token)              (bias, by default)

The scheduler runs them as pooling models (models/pooling_model.py) over the paged KV pool: a
sequence classifier pools the last token, so its prompts are prefilled in chunks and share the
prefix cache like a decoder embedder's; a token classifier needs every token's state.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lmprog.runtime.distributed.parallel_state import current_tp
from lmprog.runtime.layers.linear import linear
from lmprog.runtime.model_loader.safetensors_io import Shard
from lmprog.runtime.models.llama import LlamaModel, _head_dim, load_llama_weights, rank_kv_heads
from lmprog.runtime.models.llama_shards import LlamaShards


class _LlamaClassifier(nn.Module):
    """The body and head; `PoolingModel.classifier` runs them (this module has no forward)."""

    task: str
    pooling: str

    def __init__(self, config: Any, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dtype = dtype or torch.float32
        self.config = config
        self.num_layers: int = config.num_hidden_layers
        self.tp = current_tp()
        self.shards = LlamaShards(config, self.tp)
        self.num_kv_heads: int = rank_kv_heads(config, self.tp)
        self.head_dim: int = _head_dim(config)
        self.max_context_len: int = config.max_position_embeddings
        self.model = LlamaModel(config, dtype)
        self.score = linear(config.hidden_size, config.num_labels, self._head_bias(config), dtype)
        self.requires_grad_(False)

    @property
    def trunk(self) -> nn.Module:
        return self.model

    @property
    def head(self) -> nn.Module:
        return self.score

    def _head_bias(self, config: Any) -> bool:
        return False

    def checkpoint_shard(self, name: str) -> Shard | None:
        """The slice of checkpoint tensor `name` this rank loads (the score head: all)."""
        return self.shards.source(name)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_llama_weights(self, weights)


class LlamaForSequenceClassification(_LlamaClassifier):
    task, pooling = "classify", "last"


class LlamaForTokenClassification(_LlamaClassifier):
    task, pooling = "token_classify", "all"

    def _head_bias(self, config: Any) -> bool:
        return bool(getattr(config, "token_classification_bias", True))
