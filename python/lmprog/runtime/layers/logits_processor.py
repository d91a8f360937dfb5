"""Final step of a causal LM: hidden states -> float32 vocabulary logits, for the rows needed.

Which rows: `forward_batch.logits_indices` when set (tests, input logprobs), otherwise the last
new token of each request (all that sampling needs). Projecting only those rows matters: the
vocabulary projection is the largest matmul of a small model (SmolLM2: 49152 x 576).

`fast_linear` also lives here for now (the decoder's projections use it too): it belongs in a
`layers/linear.py` once that module exists.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from lmprog.runtime.model_executor.forward_batch import ForwardBatch


@functools.cache
def _onednn_linear_ok() -> bool:
    """Whether oneDNN's fp32 linear op is present here and agrees with F.linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    # Deterministic inputs: a random probe would move the global RNG that seeded sampling uses.
    x = torch.arange(24, dtype=torch.float32).view(3, 8) / 10
    w = torch.arange(40, dtype=torch.float32).view(5, 8).cos()
    b = torch.arange(5, dtype=torch.float32)
    try:
        got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.allclose(got, F.linear(x, w, b), atol=1e-5))


def fast_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear`, through oneDNN for float32 inference on CPU.

    Why: PyTorch sends fp32 CPU matmuls to MKL's sgemm, which is slow for the skinny shapes of
    decoding. Measured on 2 AVX2 cores, SmolLM2 shapes: the LM head [49152 x 576] takes 9.2 /
    25 / 52 ms for 1 / 16 / 64 rows with MKL and 3.9 / 12 / 29 ms with oneDNN; the 30 layers'
    projections 33 / 72 / 146 ms vs 20 / 50 / 127 ms; a 1024-token prefill is on par. The op
    (`mkldnn::_linear_pointwise`, what torch.compile's CPU backend emits) is private, so it is
    probed once and F.linear is used wherever it is missing, and for autograd (it has none).
    """
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not x.requires_grad
        and _onednn_linear_ok()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def logits_rows(forward_batch: ForwardBatch) -> torch.Tensor:
    """Indices into the step's flattened tokens [T] of the rows that get logits."""
    if forward_batch.logits_indices is not None:
        return forward_batch.logits_indices
    return forward_batch.last_token_indices()


class LogitsProcessor(nn.Module):
    """Selects rows, projects with the LM head weight ([vocab, hidden]; the embedding when tied).

    Output: float32 [rows, vocab_size]. A padded vocabulary (checkpoints that round the
    embedding up to a multiple of 64/128) is cut back to `vocab_size`.
    """

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(
        self, hidden: torch.Tensor, lm_head_weight: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        # The gather costs rows x hidden floats: noise next to the [rows, vocab] matmul.
        hidden = hidden[logits_rows(forward_batch)]
        logits = fast_linear(hidden, lm_head_weight)
        if logits.shape[-1] != self.vocab_size:
            logits = logits[:, : self.vocab_size]
        return logits.float()
