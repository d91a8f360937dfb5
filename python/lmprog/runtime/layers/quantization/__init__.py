"""Quantized weights (`--quantization`): replace a loaded model's float linear layers in place.

Methods by name; each lives in its own module, imported only when asked for (they need
sgl_kernel's C++ ops, which lmprog runs without).

    int8   weight-only int8 per output channel, activations quantized per row on the fly
           (sgl_kernel.int8_linear: AVX512-VNNI / AVX2 integer dot products)
    gguf   a .gguf model's Q4_0 / Q4_1 / Q8_0 blocks, used as the file stores them
           (sgl_kernel.gguf_linear); tensors of other types stay float

Every linear layer is a candidate, the LM head included (a tied head too: the embedding keeps
its float table for lookups, which read a few rows per step, while the head's projection reads
all of it every step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from lmprog.runtime.layers.logits_processor import TiedLMHead

if TYPE_CHECKING:
    from lmprog.runtime.model_loader import LoadedModel

QUANTIZATION_METHODS = ("int8", "gguf")


def linear_layers(
    model: nn.Module, skip: Callable[[str], bool] | None = None
) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every layer that quantization may replace: `nn.Linear`s and
    tied LM heads, except those `skip` returns True for."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if name and isinstance(module, (nn.Linear, TiedLMHead)) and not (skip and skip(name))
    ]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)


def quantize_model(
    model: nn.Module,
    method: str,
    loaded: LoadedModel | None = None,
    skip: Callable[[str], bool] | None = None,
) -> list[str]:
    """Quantizes `model`'s linear layers in place; returns the names of those replaced.

    `loaded` is the checkpoint the model came from (gguf reads its blocks from it).
    """
    if method == "int8":
        from lmprog.runtime.layers.quantization.int8 import quantize_linear_layers

        return quantize_linear_layers(model, skip)
    if method == "gguf":
        from lmprog.runtime.layers.quantization.gguf import use_gguf_blocks

        if loaded is None or loaded.source.kind != "gguf":
            given = "no checkpoint" if loaded is None else f"{loaded.source.path!r}"
            raise ValueError(
                f"quantization 'gguf' computes from a .gguf file's blocks; the model is {given}"
            )
        return use_gguf_blocks(model, loaded.gguf_blocks(), skip)
    raise ValueError(
        f"unknown quantization {method!r}; supported: {', '.join(QUANTIZATION_METHODS)}"
    )
