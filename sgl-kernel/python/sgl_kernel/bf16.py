"""bfloat16 linear layers on packed weights (csrc/cpu/bf16_linear.cpp) and their torch reference.

The weight is packed once, 16 output rows x a pair of columns per 64-byte line, the operand of
AVX512-BF16's pair dot product; the kernel reads each line once per tile of up to 4 activation
rows and accumulates in float32. Products of bf16 values are exact in float32, so the kernel and
`bf16_linear_reference` differ only in the order of the sums.

    packed = bf16_pack(w)                       # w: bfloat16 [N, K]
    y = bf16_linear(x, packed, n=w.shape[0])    # x [..., K] bfloat16 (or float32) -> x's dtype

Paths (`bf16_linear_path()`): avx512_bf16, avx512 (the pairs split into float32 vectors by
shifts: for AVX-512 CPUs without BF16; LMPROG_BF16_DOT=0 forces it) and scalar.
"""

from __future__ import annotations

import torch


def bf16_linear_path() -> str:
    return torch.ops.sgl_kernel.bf16_linear_path()


def bf16_pack(weight: torch.Tensor) -> torch.Tensor:
    """bfloat16 [N, K] -> bfloat16 [ceil(N / 16), ceil(K / 2), 32], the kernel's layout."""
    return torch.ops.sgl_kernel.bf16_pack(weight)


def bf16_pack_reference(weight: torch.Tensor) -> torch.Tensor:
    """What `bf16_pack` returns, in torch: line (b, p) holds rows 16b..16b+15, columns 2p, 2p+1."""
    n, k = weight.shape
    nb, kp = (n + 15) // 16, (k + 1) // 2
    w = torch.zeros(nb * 16, kp * 2, dtype=torch.bfloat16)
    w[:n, :k] = weight
    return w.view(nb, 16, kp, 2).permute(0, 2, 1, 3).reshape(nb, kp, 32).contiguous()


def bf16_linear(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ W.T + bias -> [..., n] in x's dtype (float32 x is rounded to bf16 first)."""
    return torch.ops.sgl_kernel.bf16_linear(x, packed, n, bias)


def bf16_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """What `bf16_linear` computes, in torch: float32 sums of the bf16 products, then x's dtype."""
    y = x.to(torch.bfloat16).float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@torch.library.register_fake("sgl_kernel::bf16_pack")
def _(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    return weight.new_empty(((n + 15) // 16, (k + 1) // 2, 32))


@torch.library.register_fake("sgl_kernel::bf16_linear")
def _(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))
