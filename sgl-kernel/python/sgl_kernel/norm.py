"""Fused RMSNorm, residual-add + RMSNorm and SiLU-and-mul (csrc/cpu/norm.cpp).

Their torch references are lmprog's own layers (`RMSNorm`, `SiluAndMul`): the kernels compute
the same values, rounding like them in bfloat16.
"""

from __future__ import annotations

import torch


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension."""
    return torch.ops.sgl_kernel.rmsnorm(x, weight, eps)


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: residual += x, then x = rmsnorm(residual)."""
    torch.ops.sgl_kernel.fused_add_rmsnorm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] for x = [gate | up]."""
    return torch.ops.sgl_kernel.silu_and_mul(x)


@torch.library.register_fake("sgl_kernel::rmsnorm")
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.register_fake("sgl_kernel::fused_add_rmsnorm")
def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    return None


@torch.library.register_fake("sgl_kernel::silu_and_mul")
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
