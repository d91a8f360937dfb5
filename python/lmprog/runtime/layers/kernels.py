"""Which kernels run lmprog's fused small ops: sgl_kernel's C++ kernels on CPU, sgl_kernel_cuda's
CUDA kernels on GPUs (both built from sgl-kernel/), or lmprog's torch path, which is also the
reference every kernel is tested against.

- CPU: used when `sgl_kernel` imports and LMPROG_CPU_ISA does not say `torch`. The choice and the
  ISA are logged once, and reported by /get_server_info.
- CUDA: used when `sgl_kernel_cuda` imports (built, or JIT-built with SGL_KERNEL_CUDA_JIT=1) and
  LMPROG_CUDA_OPS is not 0. The choice is logged once.

`kernels_for(x)` picks by tensor, for the ops both packages have with the same signatures
(rmsnorm, fused_add_rmsnorm, silu_and_mul, rope_kv_store). The rest of sgl_kernel (attention,
the decode stack, packed linear layers) is CPU-only and reached through `cpu_kernels()`.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType
from typing import Any

import torch

logger = logging.getLogger(__name__)
ISA_ENV = "LMPROG_CPU_ISA"  # torch | scalar | avx2 | avx512 | amx: the highest path allowed
CUDA_OPS_ENV = "LMPROG_CUDA_OPS"  # 0: the torch path on GPUs
CPU_DTYPES = (torch.float32, torch.bfloat16)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The sgl_kernel module, or None when lmprog runs its torch path on CPU."""
    if os.environ.get(ISA_ENV, "").lower() == "torch":
        logger.info("CPU kernels: off (%s=torch): the torch path runs", ISA_ENV)
        return None
    try:
        import sgl_kernel
    except ImportError as e:
        logger.info("CPU kernels: not installed (%s): the torch path runs", e)
        return None
    logger.info(
        "CPU kernels: sgl_kernel on %s (the CPU offers %s)",
        sgl_kernel.cpu_isa(),
        sgl_kernel.detected_isa(),
    )
    return sgl_kernel


@functools.cache
def cuda_kernels() -> ModuleType | None:
    """The sgl_kernel_cuda module, or None when lmprog runs its torch path on GPUs."""
    if os.environ.get(CUDA_OPS_ENV, "1") == "0":
        logger.info("CUDA kernels: off (%s=0): the torch path runs", CUDA_OPS_ENV)
        return None
    try:
        import sgl_kernel_cuda
    except ImportError as e:
        logger.info("CUDA kernels: not available (%s): the torch path runs", e)
        return None
    logger.info("CUDA kernels: sgl_kernel_cuda, from %s", sgl_kernel_cuda.source)
    return sgl_kernel_cuda


def kernels_for(x: Any) -> ModuleType | None:
    """The kernel module whose fused ops can take tensor `x`, which must be contiguous:
    sgl_kernel for float32 or bfloat16 on CPU, sgl_kernel_cuda for float32, float16 or bfloat16
    on CUDA. None (the torch path) otherwise, or where that module is not available."""
    if not x.is_contiguous():
        return None
    if x.device.type == "cpu":
        return cpu_kernels() if x.dtype in CPU_DTYPES else None
    if x.device.type == "cuda":
        return cuda_kernels() if x.dtype in CUDA_DTYPES else None
    return None


def cpu_path() -> str:
    """What runs on CPU: the kernels' ISA (amx, avx512, avx2, scalar) or 'torch'."""
    kernels = cpu_kernels()
    return kernels.cpu_isa() if kernels is not None else "torch"
