"""Whether lmprog's C++ CPU kernels (the `sgl_kernel` package, built from sgl-kernel/) are used.

They are used when the package imports and LMPROG_CPU_ISA does not say `torch`; otherwise lmprog
runs its torch path, which is also the reference every kernel is tested against. The choice and
the ISA are logged once, and reported by /get_server_info.
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


def kernels_for(x: Any) -> ModuleType | None:
    """sgl_kernel when its elementwise ops can take tensor `x` (contiguous float32 or bfloat16,
    on CPU), else None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    return cpu_kernels() if x.is_contiguous() else None


def cpu_path() -> str:
    """What runs on CPU: the kernels' ISA (amx, avx512, avx2, scalar) or 'torch'."""
    kernels = cpu_kernels()
    return kernels.cpu_isa() if kernels is not None else "torch"
