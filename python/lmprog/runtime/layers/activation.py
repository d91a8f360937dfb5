"""The gated MLP activation: `silu(gate) * up` on a fused [.., 2 * I] gate_up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmprog.runtime.layers.kernels import kernels_for


class SiluAndMul(nn.Module):
    """x = [gate | up] along the last dim (gate first, as gate_up_proj stacks them) -> [.., I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = kernels_for(x)
        if kernels is not None:
            return kernels.silu_and_mul(x)
        d = x.shape[-1] // 2
        # silu writes a fresh tensor; multiplying into it in place saves a second [T, I] buffer.
        return F.silu(x[..., :d]).mul_(x[..., d:])
