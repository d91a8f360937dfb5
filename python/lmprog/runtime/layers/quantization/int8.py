"""Weight-only int8 linear layers on sgl_kernel's `int8_linear` op.

Why: decoding one stream on a CPU is bound by reading the weights (each step reads them all once),
so storing them as int8 reads a quarter of fp32's bytes. The kernel also quantizes each row of
activations to 8 bits on the fly, to use integer dot products (4x the multiply-adds of fp32 FMAs
per instruction); the error that adds is measured in sgl-kernel's tests and benchmarks.

Layers are quantized after the float checkpoint is loaded: `quantize_linear_layers(model)` swaps
every `nn.Linear` (lmprog's `FastLinear` included) and tied LM head for an `Int8Linear`, dropping
the float weight (a tied head's table stays with the embedding, for lookups).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

from lmprog.runtime.layers.quantization import linear_layers, replace_module


def kernel_ops() -> ModuleType:
    """`sgl_kernel.quant`; fails saying how to get it when the package is not built."""
    try:
        from sgl_kernel import quant
    except ImportError as e:
        raise RuntimeError(
            "int8 quantization needs the sgl_kernel package "
            f"(pip install --no-build-isolation -e sgl-kernel): {e}"
        ) from e
    if not hasattr(torch.ops.sgl_kernel, "int8_linear"):
        raise RuntimeError("sgl_kernel was built without its int8 ops; rebuild sgl-kernel")
    return quant


class Int8Linear(nn.Module):
    """y = x W^T + b, with W held as int8 per output channel and packed for the kernel.

    Buffers: `packed` (int8 [ceil(N/16), ceil(K/4) + 1, 64], see sgl_kernel.quant.int8_pack),
    `scales` (float32 [N]: W[n] ~ q[n] * scales[n]) and `bias` (float32 [N] or None).
    forward: x [..., in_features], float32 or bfloat16 -> [..., out_features] in x's dtype.
    Inference only: there is no gradient through the op.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        in_features: int,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = scales.shape[0]
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """Quantizes a float [N, K] weight (round to nearest, scale = max|W[n]| / 127)."""
        quant = kernel_ops()
        qweight, scales = quant.quantize_int8_per_channel(weight.detach())
        bias = None if bias is None else bias.detach().float().contiguous()
        return cls(quant.int8_pack(qweight), scales, bias, weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.sgl_kernel.int8_linear(x, self.packed, self.scales, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


def quantize_linear_layers(
    model: nn.Module, skip: Callable[[str], bool] | None = None
) -> list[str]:
    """Swaps each linear layer inside `model` (see `linear_layers`) for an `Int8Linear`, in
    place, except those whose qualified name `skip` returns True for; returns their names."""
    targets = linear_layers(model, skip)
    for name, module in targets:
        replace_module(model, name, Int8Linear.from_float(module.weight, module.bias))
    return [name for name, _ in targets]
