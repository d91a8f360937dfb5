"""Linear layers: `fast_linear` (F.linear, through oneDNN for fp32 on CPU) and a module using it."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def onednn_linear_ok() -> bool:
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
        and onednn_linear_ok()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def uninitialized(module_cls: type[nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """`module_cls(*args)` with uninitialized weights, on the current default device.

    Weights come from the checkpoint; a random init of 100M+ floats costs seconds. The device is
    passed explicitly because skip_init ignores a `with torch.device(...)` context.
    """
    device = torch.get_default_device()
    return nn.utils.skip_init(module_cls, *args, device=device, **kwargs)


class FastLinear(nn.Linear):
    """nn.Linear through `fast_linear` (oneDNN for fp32 on CPU: ~1.5x faster when decoding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_linear(x, self.weight, self.bias)


def linear(in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> nn.Linear:
    return uninitialized(FastLinear, in_features, out_features, bias=bias, dtype=dtype)
