"""The float dtype `dtype="auto"` picks on a CPU: bfloat16 where the CPU computes it natively.

CPUs with AMX (Sapphire Rapids on) or AVX512-BF16 (Cooper Lake, Zen 4) run oneDNN's bf16 matmuls
at twice fp32's rate or more and halve the bytes every decode step reads; elsewhere bf16 is
emulated and slower than fp32, so float32 stays the default there. LMPROG_CPU_ISA set to avx2,
scalar or torch (lowering the kernels for tests and comparisons) also means float32.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import torch

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_LOWERED_ISAS = ("torch", "scalar", "avx2")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (/proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def auto_cpu_dtype(flags: Iterable[str] | None = None, isa_env: str | None = None) -> torch.dtype:
    """bfloat16 when `flags` (default: this CPU's) include native bf16 and the ISA is not
    lowered by `isa_env` (default: $LMPROG_CPU_ISA), else float32."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    isa_env = os.environ.get("LMPROG_CPU_ISA", "") if isa_env is None else isa_env
    if isa_env.lower() in _LOWERED_ISAS:
        return torch.float32
    return torch.bfloat16 if any(f in flags for f in BF16_FLAGS) else torch.float32
