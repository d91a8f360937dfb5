"""Linear layers computed straight from a GGUF file's quantized blocks (`--quantization gguf`).

Why: a .gguf model already holds its weights at 4.5-8.5 bits (SmolLM2-135M's Q4_1 file: 68 MB
of Q4_1 layers plus a 30 MB Q8_0 embedding, against 540 MB in fp32), and decoding one stream on
a CPU is bound by the bytes each step reads. The loader's default dequantizes to float; this
keeps the blocks (repacked for the kernel, values and fp16 scales unchanged) and lets
sgl_kernel's `gguf_linear` compute from them, so outputs equal those of the dequantized
weights up to the rounding of the activations (quantized per 32-element block to int8).

A fused layer (qkv, gate_up) takes its parts' rows in order; that works because GGUF blocks run
along K, so rows are independent. A layer whose parts are missing from the blocks, or mix
types, or have a type the kernel lacks (Q4_K, Q6_K, ...), keeps its float weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import ModuleType

import torch
from torch import nn

from lmprog.runtime.layers.quantization import linear_layers, replace_module
from lmprog.runtime.model_loader.gguf_loader import GGUFBlocks

logger = logging.getLogger(__name__)


def kernel_ops() -> ModuleType:
    """`sgl_kernel.gguf`; fails saying how to get it when the package is not built."""
    try:
        from sgl_kernel import gguf
    except ImportError as e:
        raise RuntimeError(
            "quantization 'gguf' needs the sgl_kernel package "
            f"(pip install --no-build-isolation -e sgl-kernel): {e}"
        ) from e
    return gguf


class GGUFLinear(nn.Module):
    """y = x W^T + b, with W held as GGUF blocks of one type, packed for the kernel.

    Buffers: `packed` (uint8, sgl_kernel.gguf.gguf_pack's layout) and `bias` (float32 [N] or
    None). forward: x [..., in_features], float32 or bfloat16 -> [..., out_features] in x's
    dtype. Inference only.
    """

    def __init__(
        self, packed: torch.Tensor, qtype: int, shape: tuple[int, int], bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.qtype = qtype
        self.out_features, self.in_features = shape
        self.register_buffer("packed", packed)
        self.register_buffer("bias", bias)

    @classmethod
    def from_blocks(cls, parts: list[GGUFBlocks], bias: torch.Tensor | None) -> GGUFLinear:
        """One layer from the blocks of its parts (stacked by rows), all of one type and K."""
        qtype, k = parts[0].qtype, parts[0].shape[1]
        assert all(p.qtype == qtype and p.shape[1] == k for p in parts), "parts differ"
        raw = torch.cat([p.raw for p in parts]) if len(parts) > 1 else parts[0].raw
        n = sum(p.shape[0] for p in parts)
        bias = None if bias is None else bias.detach().float().contiguous()
        return cls(kernel_ops().gguf_pack(raw, qtype), qtype, (n, k), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.sgl_kernel.gguf_linear(
            x, self.packed, self.qtype, self.out_features, self.in_features, self.bias
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"qtype={self.qtype}, bias={self.bias is not None}"
        )


def use_gguf_blocks(
    model: nn.Module,
    blocks: Mapping[str, GGUFBlocks],
    skip: Callable[[str], bool] | None = None,
) -> list[str]:
    """Replaces each linear layer of `model` whose weight the blocks hold in a type the kernel
    computes with a `GGUFLinear`; returns the names replaced. The model names each layer's
    checkpoint parts (`checkpoint_names`)."""
    supported = set(kernel_ops().BLOCK_BYTES)
    done, kept = [], []
    for name, module in linear_layers(model, skip):
        parts = [blocks.get(n) for n in model.checkpoint_names(name)]
        if (
            any(p is None for p in parts)
            or len({(p.qtype, p.shape[1]) for p in parts}) != 1
            or parts[0].qtype not in supported
        ):
            kept.append(name)
            continue
        replace_module(model, name, GGUFLinear.from_blocks(parts, module.bias))
        done.append(name)
    if kept:
        logger.info(
            "gguf: %d layers keep float weights (types the kernel lacks): %s",
            len(kept),
            ", ".join(kept[:4]) + (" ..." if len(kept) > 4 else ""),
        )
    return done
