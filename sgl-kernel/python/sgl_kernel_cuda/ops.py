"""The CUDA ops (csrc/cuda/) with the names, signatures and semantics of sgl_kernel's CPU ones:
fused RMSNorm, residual-add + RMSNorm, SiLU-and-mul, and rotary embedding fused with the K/V
store. Float32, float16 and bfloat16 CUDA tensors.

Their torch references are lmprog's own layers (`RMSNorm`, `SiluAndMul`, `RotaryEmbedding.apply`
followed by the pool's `set_kv_buffer`): the kernels compute the same values, rounding like them
in the half-precision dtypes.
"""

from __future__ import annotations

import torch


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension."""
    return torch.ops.sgl_kernel_cuda.rmsnorm(x, weight, eps)


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: residual += x, then x = rmsnorm(residual)."""
    torch.ops.sgl_kernel_cuda.fused_add_rmsnorm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] for x = [gate | up]."""
    return torch.ops.sgl_kernel_cuda.silu_and_mul(x)


def rope_kv_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    loc: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates the q and k heads of `qkv` [T, (H + 2 Hkv) D] by `cos`/`sin` (float32
    [T, D / 2], the rows of the tokens' positions), writes rotated k and plain v into
    `k_buf`/`v_buf` [slots, Hkv, D] at slots `loc` [T]; returns q [T, H, D] and k [T, Hkv, D].

    A slot outside the pool stops the kernel with a device-side trap (the CPU op raises instead):
    checking `loc` on the host would synchronize every layer."""
    return torch.ops.sgl_kernel_cuda.rope_kv_store(
        qkv, cos, sin, loc, k_buf, v_buf, num_heads, num_kv_heads
    )


@torch.library.register_fake("sgl_kernel_cuda::rmsnorm")
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.register_fake("sgl_kernel_cuda::fused_add_rmsnorm")
def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    return None


@torch.library.register_fake("sgl_kernel_cuda::silu_and_mul")
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.register_fake("sgl_kernel_cuda::rope_kv_store")
def _(qkv, cos, sin, loc, k_buf, v_buf, num_heads, num_kv_heads):
    t, d = qkv.shape[0], 2 * cos.shape[-1]
    return qkv.new_empty((t, num_heads, d)), qkv.new_empty((t, num_kv_heads, d))
