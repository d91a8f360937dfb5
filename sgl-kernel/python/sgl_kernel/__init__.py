"""sgl_kernel: lmprog's C++ kernels for CPUs, registered as torch ops (`torch.ops.sgl_kernel.*`).

Importing the package loads the extension, which registers every op; each op also has a fake
(meta) implementation, so it composes with `torch.compile`. Which ISA the kernels use is decided
once per process from the CPU and the OS (AMX -> AVX-512 -> AVX2 -> scalar); the environment
variable LMPROG_CPU_ISA (scalar | avx2 | avx512 | amx) lowers it, for tests and comparisons.

lmprog runs without this package (its torch path); with it, the ops below replace the torch ones.
"""

from __future__ import annotations

import torch

from sgl_kernel import _C
from sgl_kernel.attention import cascade_decode_attention, decode_attention, extend_attention
from sgl_kernel.bf16 import bf16_linear, bf16_pack
from sgl_kernel.gguf import gguf_linear, gguf_pack
from sgl_kernel.norm import fused_add_rmsnorm, rmsnorm, silu_and_mul
from sgl_kernel.quant import int8_linear, int8_pack, quantize_int8_per_channel
from sgl_kernel.rope import rope_kv_store

__all__ = [
    "bf16_linear",
    "bf16_pack",
    "cascade_decode_attention",
    "cpu_isa",
    "decode_attention",
    "detected_isa",
    "extend_attention",
    "fused_add_rmsnorm",
    "gguf_linear",
    "gguf_pack",
    "has_avx512_vnni",
    "int8_linear",
    "int8_pack",
    "quantize_int8_per_channel",
    "rmsnorm",
    "rope_kv_store",
    "silu_and_mul",
]
__version__ = "0.1.0"


def cpu_isa() -> str:
    """The ISA the kernels run with: amx, avx512, avx2 or scalar."""
    return _C.cpu_isa()


def detected_isa() -> str:
    """The best ISA the CPU and OS offer, whatever LMPROG_CPU_ISA says."""
    return _C.detected_isa()


def has_avx512_vnni() -> bool:
    return _C.has_avx512_vnni()


assert hasattr(torch.ops.sgl_kernel, "rmsnorm"), "the extension registered no ops"
