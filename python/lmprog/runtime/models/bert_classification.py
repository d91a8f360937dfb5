"""BERT classifiers, as HF's `BertForSequenceClassification` and `BertForTokenClassification`:
the encoder (`bert.*`, models/bert.py) and a head.

    sequence:  logits = classifier(tanh(pooler.dense(state of [CLS])))   (HF's BertPooler)
    token:     logits = classifier(state of every token)

A cross-encoder (e.g. ms-marco-MiniLM) is a sequence classifier with one label, fed the pair
"[CLS] a [SEP] b [SEP]" with token type 0 for the first segment and 1 for the second.
Dropout is an identity at inference and has no weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lmprog.runtime.layers.linear import linear
from lmprog.runtime.models.bert import BertModel
from lmprog.runtime.models.weight_loading import Target, expected_keys, load_named_weights


class BertPoolerHead(nn.Module):
    """HF's BertPooler (dense + tanh over the [CLS] state) followed by the classifier."""

    def __init__(self, hidden: int, num_labels: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.dense = linear(hidden, hidden, True, dtype)
        self.classifier = linear(hidden, num_labels, True, dtype)

    def forward(self, cls_states: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.dense(cls_states)))


class TokenHead(nn.Module):
    """The classifier over every token's state."""

    def __init__(self, hidden: int, num_labels: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.classifier = linear(hidden, num_labels, True, dtype)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.classifier(states)


class _BertClassifier(nn.Module):
    """The encoder and a head; `PoolingModel.classifier` runs them (this module has no forward).
    `head` holds the classifier: `head.classifier.*` loads from HF's `classifier.*`."""

    task: str
    pooling: str
    head_class: type[nn.Module]

    def __init__(self, config: Any, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dtype = dtype or torch.float32
        self.config = config
        self.bert = BertModel(config, dtype)
        self.num_layers = self.bert.num_layers
        self.num_kv_heads = self.bert.num_kv_heads
        self.head_dim = self.bert.head_dim
        self.max_context_len = self.bert.max_context_len
        self.is_encoder = True
        self.head = self.head_class(config.hidden_size, config.num_labels, dtype)
        self.requires_grad_(False)

    @property
    def trunk(self) -> nn.Module:
        return self.bert

    def _head_target(self, name: str) -> str | None:
        """Our name of an HF head weight; None: an encoder weight."""
        if name.startswith("classifier."):
            return f"head.{name}"
        return None

    def _target(self, name: str) -> Target | None:
        """HF name -> (our parameter, its rows, key in the loaded set); None: not used here."""
        head = self._head_target(name)
        if head is not None:
            return head, slice(None), head
        found = self.bert._target(name)
        if found is None:
            return None
        target, rows, key = found
        return f"bert.{target}", rows, f"bert.{key}"

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies HF-named weights in; fails on an unknown name, a wrong shape or a missing one."""
        expected = expected_keys(self, {"qkv_proj": "qkv"})
        load_named_weights(self, weights, self._target, expected, "bert")


class BertForSequenceClassification(_BertClassifier):
    task, pooling, head_class = "classify", "cls", BertPoolerHead

    def _head_target(self, name: str) -> str | None:
        if name.startswith("bert.pooler.dense."):
            return "head.dense." + name.removeprefix("bert.pooler.dense.")
        return super()._head_target(name)


class BertForTokenClassification(_BertClassifier):
    task, pooling, head_class = "token_classify", "all", TokenHead
