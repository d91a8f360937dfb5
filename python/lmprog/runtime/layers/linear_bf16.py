"""bfloat16 linear layers on sgl_kernel's packed-weight kernel (`bf16_linear`).

Why: decoding reads every weight once per step, so bf16 weights should take half of fp32's time,
but oneDNN's bf16 matmul at one row ran at 6-15 GB/s on an AVX512-BF16 CPU, no faster per output
than fp32. The kernel packs the weight for AVX512-BF16's pair dot product and measured 1.9-3.6x
faster at one row, 1.2-1.6x at 64 rows and 3-11% slower at 1,024 (benchmarks/README.md). The values are the same bf16
weights, only laid out differently: this is not quantization.

`pack_bf16_linears(model)` swaps every bf16 `nn.Linear` and tied LM head of a loaded model for a
`PackedBf16Linear` (the ModelRunner calls it for bf16 models on CPU), when the kernel has a
vector path here (avx512_bf16, or avx512 on AVX-512 CPUs without BF16); elsewhere it does nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from lmprog.runtime.layers.kernels import cpu_kernels
from lmprog.runtime.layers.quantization import linear_layers, replace_module

VECTOR_PATHS = ("avx512_bf16", "avx512")


class PackedBf16Linear(nn.Module):
    """y = x W^T + b with W bfloat16, packed for the kernel (sgl_kernel.bf16.bf16_pack).

    Buffers: `packed` (bfloat16 [ceil(N/16), ceil(K/2), 32]) and `bias` (float32 [N] or None).
    forward: x [..., in_features] -> [..., out_features] in x's dtype. Inference only.
    """

    def __init__(
        self, packed: torch.Tensor, bias: torch.Tensor | None, in_features: int, out_features: int
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", packed)
        self.register_buffer("bias", bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> PackedBf16Linear:
        n, k = weight.shape
        packed = torch.ops.sgl_kernel.bf16_pack(weight.detach().to(torch.bfloat16))
        bias = None if bias is None else bias.detach().float().contiguous()
        return cls(packed, bias, k, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.sgl_kernel.bf16_linear(x, self.packed, self.out_features, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


def bf16_kernel_path() -> str | None:
    """The kernel's vector path in this process, or None (no kernels, or only scalar code)."""
    kernels = cpu_kernels()
    if kernels is None or not hasattr(torch.ops.sgl_kernel, "bf16_linear"):
        return None
    path = torch.ops.sgl_kernel.bf16_linear_path()
    return path if path in VECTOR_PATHS else None


def pack_bf16_linears(model: nn.Module) -> list[str]:
    """Swaps `model`'s bf16 linear layers (the LM head included) for `PackedBf16Linear`s in
    place, where the kernel has a vector path; returns the names of those swapped."""
    if bf16_kernel_path() is None:
        return []
    targets = [(name, m) for name, m in linear_layers(model) if m.weight.dtype == torch.bfloat16]
    for name, module in targets:
        replace_module(model, name, PackedBf16Linear.from_weight(module.weight, module.bias))
    return [name for name, _ in targets]
