"""Quantized weights (`--quantization`): replace a loaded model's float linear layers in place.

Methods by name; each lives in its own module, imported only when asked for (they need
sgl_kernel's C++ ops, which lmprog runs without).

    int8   weight-only int8 per output channel, activations quantized per row on the fly
           (sgl_kernel.int8_linear: AVX512-VNNI / AVX2 integer dot products)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

QUANTIZATION_METHODS = ("int8",)


def quantize_model(
    model: nn.Module, method: str, skip: Callable[[str], bool] | None = None
) -> list[str]:
    """Quantizes every linear layer of `model` not `skip`ped by name; returns the names done."""
    if method == "int8":
        from lmprog.runtime.layers.quantization.int8 import quantize_linear_layers

        return quantize_linear_layers(model, skip)
    raise ValueError(
        f"unknown quantization {method!r}; supported: {', '.join(QUANTIZATION_METHODS)}"
    )
