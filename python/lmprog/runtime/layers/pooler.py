"""Pooling: the hidden states of each sequence's tokens -> one row per sequence (or per token)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmprog.runtime.model_executor.forward_batch import ForwardBatch
from lmprog.runtime.model_loader.pooling_config import PoolingConfig


class Pooler(nn.Module):
    """mean (over every token of a sequence, special tokens included, as sentence-transformers
    does), cls (the first token), last (the last token) or all (every token, unpooled); then
    L2-normalize if configured.

    Mean and cls need the whole sequence in the step; last needs only its last token, so a
    decoder's prompt may be prefilled in chunks (only the final chunk's row counts); all gives
    the step's new tokens, which the scheduler gathers chunk by chunk.
    """

    def __init__(self, config: PoolingConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        """[T, hidden] states of the step's tokens -> [B, hidden] (all: [T, hidden])."""
        lens = forward_batch.extend_seq_lens
        ends = torch.cumsum(lens, 0)
        kind = self.config.kind
        if kind == "all":
            pooled = hidden
        elif kind == "last":
            pooled = hidden[ends - 1]
        elif kind == "cls":
            pooled = hidden[ends - lens]
        else:
            seq_of_token = torch.repeat_interleave(
                torch.arange(lens.numel(), device=lens.device), lens
            )
            sums = torch.zeros(
                lens.numel(), hidden.shape[1], dtype=torch.float32, device=hidden.device
            )
            sums.index_add_(0, seq_of_token, hidden.float())
            pooled = sums / lens[:, None]
        return F.normalize(pooled.float(), dim=-1) if self.config.normalize else pooled
