"""Log-probabilities of given tokens under a step's logits (prompt logprobs).

The sampler scores the tokens it picks; this scores tokens that are already known: each
prompt token under the logits of the position before it.
"""

from __future__ import annotations

import torch

# Rows normalised at a time: log_softmax copies its input, and a long prompt's logits are
# rows x vocab floats (2048 x 49152 x 4 bytes = 400 MB); blocks keep the copy small.
_BLOCK_ROWS = 256


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, top: int
) -> list[tuple[float, dict[int, float]]]:
    """For each row r: (log p(targets[r]), {token id: log p} of the `top` most likely tokens),
    under softmax(logits[r]). `logits` is [R, vocab] float32, `targets` [R] int64."""
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits for {targets.shape[0]} targets")
    out: list[tuple[float, dict[int, float]]] = []
    for lo in range(0, logits.shape[0], _BLOCK_ROWS):
        block = torch.log_softmax(logits[lo : lo + _BLOCK_ROWS].float(), dim=-1)
        chosen = block.gather(1, targets[lo : lo + _BLOCK_ROWS, None]).squeeze(1).tolist()
        if top:
            values, ids = block.topk(min(top, block.shape[1]), dim=-1)
            tops = [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        else:
            tops = [{} for _ in chosen]
        out.extend(zip(chosen, tops))
    return out
