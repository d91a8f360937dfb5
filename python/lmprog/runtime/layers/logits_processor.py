"""Final step of a causal LM: hidden states -> float32 vocabulary logits, for the rows needed.

Which rows: `forward_batch.logits_indices` when set (tests, input logprobs), otherwise the last
new token of each request (all that sampling needs). Projecting only those rows matters: the
vocabulary projection is the largest matmul of a small model (SmolLM2: 49152 x 576).
"""

from __future__ import annotations

import torch
from torch import nn

from lmprog.runtime.distributed.parallel_state import current_tp
from lmprog.runtime.layers.linear import fast_linear
from lmprog.runtime.model_executor.forward_batch import ForwardBatch


def logits_rows(forward_batch: ForwardBatch) -> torch.Tensor:
    """Indices into the step's flattened tokens [T] of the rows that get logits."""
    if forward_batch.logits_indices is not None:
        return forward_batch.logits_indices
    return forward_batch.last_token_indices()


class TiedLMHead(nn.Module):
    """The LM head of a model with tied embeddings: projects with the embedding's table.

    The embedding is held by reference, not registered as a submodule, so its weight is named
    (and loaded) once, under the embedding. Quantization replaces this module with a quantized
    copy of the table while the embedding keeps its float rows for lookups.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self._embedding = (embedding,)  # a tuple hides it from nn.Module's registration

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].weight

    @property
    def bias(self) -> None:
        return None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return fast_linear(hidden, self.weight)


class LogitsProcessor(nn.Module):
    """Selects rows, projects them with the LM head module (a linear layer of [vocab, hidden],
    `TiedLMHead` when the embedding is tied, or their quantized replacements).

    Output: float32 [rows, vocab_size]. A padded vocabulary (checkpoints that round the
    embedding up to a multiple of 64/128) is cut back to `vocab_size`. Under tensor parallelism
    each rank's head projects its shard of the vocabulary; the shards are gathered in rank
    order, so every rank returns the whole rows.
    """

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tp = current_tp()

    def forward(
        self, hidden: torch.Tensor, lm_head: nn.Module, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        # The gather costs rows x hidden floats: noise next to the [rows, vocab] matmul.
        hidden = hidden[logits_rows(forward_batch)]
        logits = self.tp.all_gather_last(lm_head(hidden))
        if logits.shape[-1] != self.vocab_size:
            logits = logits[:, : self.vocab_size]
        return logits.float()
