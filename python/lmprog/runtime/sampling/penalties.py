"""Presence, frequency and repetition penalties for a batch of logits, in one batched pass.

Semantics (vLLM's, which follow the OpenAI API for presence/frequency):

    seen(t)   = t occurs in the prompt or in the output so far
    count(t)  = occurrences of t in the output so far (the prompt does not count)

    if seen(t):   logit = logit / r  if logit > 0  else  logit * r       (repetition_penalty r)
    logit -= frequency_penalty * count(t)
    logit -= presence_penalty * (count(t) > 0)

Only the (row, token) cells that occur in some row's tokens can change, so the work is
O(tokens) plus one zero-filled [B, V] count buffer; no Python loop over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from lmprog.runtime.host_copy import to_device
from lmprog.runtime.sampling.sampling_params import SamplingParams


@dataclass
class PenaltyInputs:
    """Per-row penalty factors and the flattened token occurrences they apply to.

    Rows are batch rows. A row with no penalty contributes no tokens; a row whose
    repetition_penalty is 1 contributes no prompt tokens (the prompt only matters for
    repetition). Token ids are inside [0, vocab_size): others were dropped on construction.
    """

    presence: torch.Tensor  # [B] float32
    frequency: torch.Tensor  # [B] float32
    repetition: torch.Tensor  # [B] float32
    output_rows: torch.Tensor  # [N_out] int64: the row of each generated token
    output_ids: torch.Tensor  # [N_out] int64: the generated token
    prompt_rows: torch.Tensor  # [N_prompt] int64
    prompt_ids: torch.Tensor  # [N_prompt] int64

    @classmethod
    def from_rows(
        cls,
        params: Sequence[SamplingParams],
        output_ids: Sequence[Sequence[int]],
        prompt_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device,
    ) -> PenaltyInputs | None:
        """Build the inputs for a batch, or None when no row uses a penalty."""
        penalised = [i for i, p in enumerate(params) if p.uses_penalties]
        if not penalised:
            return None
        repeated = [i for i in penalised if params[i].repetition_penalty != 1.0]
        out_rows, out_ids = flatten_rows(output_ids, penalised, vocab_size)
        prompt_rows, prompt_ids_flat = flatten_rows(prompt_ids, repeated, vocab_size)

        def per_row(name: str) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=torch.float32)

        tensors = (
            per_row("presence_penalty"),
            per_row("frequency_penalty"),
            per_row("repetition_penalty"),
            out_rows,
            out_ids,
            prompt_rows,
            prompt_ids_flat,
        )
        return cls(*(to_device(t, torch.device(device)) for t in tensors))


def flatten_rows(
    token_lists: Sequence[Sequence[int]], rows: Sequence[int], vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate token_lists[r] for r in rows into (row index, token id) int64 CPU tensors,
    dropping ids outside [0, vocab_size)."""
    lengths = [len(token_lists[r]) for r in rows]
    total = sum(lengths)
    # np.fromiter walks the lists in C: no Python-level loop over tokens.
    flat = np.fromiter(chain.from_iterable(token_lists[r] for r in rows), np.int64, count=total)
    ids = torch.from_numpy(flat)
    row_index = torch.repeat_interleave(
        torch.tensor(list(rows), dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64)
    )
    keep = (ids >= 0) & (ids < vocab_size)
    return row_index[keep], ids[keep]


def apply_penalties_(logits: torch.Tensor, inputs: PenaltyInputs) -> torch.Tensor:
    """Apply the penalties to `logits` [B, V] (float) in place and return it.

    Every token id in `inputs` must be < V (guaranteed when V >= the vocab_size that
    built the inputs).
    """
    batch, width = logits.shape
    rows = torch.cat([inputs.output_rows, inputs.prompt_rows])
    ids = torch.cat([inputs.output_ids, inputs.prompt_ids])
    if rows.numel() == 0:
        return logits
    counts = _output_counts(inputs, batch, width, logits.dtype)
    count = counts[rows * width + ids]
    values = logits[rows, ids]
    repetition = inputs.repetition[rows]
    values = torch.where(values > 0, values / repetition, values * repetition)
    values -= inputs.frequency[rows] * count
    values -= inputs.presence[rows] * (count > 0).to(values.dtype)
    # A (row, token) cell may be listed several times (repeats, or prompt and output);
    # every copy computed the same value from the same inputs, so which write wins
    # does not matter.
    logits[rows, ids] = values
    return logits


def _output_counts(
    inputs: PenaltyInputs, batch: int, width: int, dtype: torch.dtype
) -> torch.Tensor:
    """Occurrences of each token in each row's output, as a flat [B * V] tensor.

    NOTE: float counts added with index_add_ stay exact (integers below 2**24), so the
    result is deterministic on CUDA too, whatever order the atomic adds land in.
    """
    counts = torch.zeros(batch * width, dtype=dtype, device=inputs.output_ids.device)
    keys = inputs.output_rows * width + inputs.output_ids
    counts.index_add_(0, keys, torch.ones_like(keys, dtype=dtype))
    return counts
