"""The token embedding over this rank's share of the vocabulary (distributed/partition.py).

Each rank holds `padded = ceil(V / N)` rows; rank r's real rows are token ids [start, stop).
A lookup takes the ids this rank holds, zeros the others' rows, and sums over the ranks: every
token's row comes from exactly one rank. The last rank's padding rows are never looked up, and
the logits they give a tied LM head are cut off after the gather (LogitsProcessor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmprog.runtime.distributed.parallel_state import current_tp
from lmprog.runtime.distributed.partition import vocab_rows


class VocabParallelEmbedding(nn.Embedding):
    """nn.Embedding whose `weight` is this rank's [padded, hidden] rows (the whole table on
    one rank); `forward`: [T] token ids -> [T, hidden], the same on every rank."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        tp = current_tp()
        start, stop, padded = vocab_rows(vocab_size, tp.rank, tp.size)
        super().__init__(padded, hidden_size, dtype=dtype, device=device)
        self.tp, self.vocab_start, self.vocab_stop = tp, start, stop

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.is_sharded:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_stop - self.vocab_start)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(rows.masked_fill_(outside.unsqueeze(-1), 0))
