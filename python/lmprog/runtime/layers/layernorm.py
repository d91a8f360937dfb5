"""RMSNorm, with an optional fused residual add (the pre-norm transformer's hot path).

A pre-norm decoder layer computes `h = x + attn(norm(x))`, then `x' = h + mlp(norm(h))`. Carrying
the residual stream separately lets one call do "add the sublayer output, then normalize":

    normed, residual = norm(sublayer_out, residual)   # residual <- residual + sublayer_out

The residual is updated in place: it is a tensor the model's forward owns (the embedding lookup
or an earlier sum), so no one else observes the change, and the step saves one allocation. With
the kernels (sgl_kernel on CPU, sgl_kernel_cuda on GPUs: layers/kernels.py), one fused kernel does
the add and the norm (the sublayer output, also the model's own, receives the normalized values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmprog.runtime.layers.kernels import kernels_for


class RMSNorm(nn.Module):
    """`weight * x / sqrt(mean(x^2) + eps)` over the last dimension (HF Llama's LlamaRMSNorm).

    Statistics are computed in float32 whatever the input dtype; for low-precision inputs the
    normalized value is cast back before the weight multiply, as HF does, so bf16/fp16 results
    round the same way.
    """

    def __init__(
        self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # One fused kernel instead of pow/mean/rsqrt/mul/mul: 5x fewer passes over memory.
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); or, with `residual`, (norm(residual + x), residual + x), updating `residual`
        (and, on the kernel path, overwriting `x` with the result)."""
        kernels = kernels_for(x)
        if residual is None:
            if kernels is not None:
                return kernels.rmsnorm(x, self.weight, self.eps)
            return self._norm(x)
        if kernels is not None and residual.is_contiguous():
            kernels.fused_add_rmsnorm(x, residual, self.weight, self.eps)
            return x, residual
        residual.add_(x)
        return self._norm(residual), residual

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
