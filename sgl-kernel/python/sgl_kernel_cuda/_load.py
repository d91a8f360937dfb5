"""Registers the CUDA ops with torch, from the first of: ops already registered (a library
loaded with `torch.ops.load_library`), the prebuilt extension `sgl_kernel_cuda._C`, or, opted
into with SGL_KERNEL_CUDA_JIT=1, a JIT build of this checkout's csrc/cuda."""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from sgl_kernel_cuda import _build

logger = logging.getLogger(__name__)
JIT_ENV = "SGL_KERNEL_CUDA_JIT"
JIT_NAME = "sgl_kernel_cuda_jit"
BUILD_HINT = "cd sgl-kernel && SGL_KERNEL_BUILD=cuda python setup.py build_ext --inplace"


def registered() -> bool:
    return hasattr(torch.ops.sgl_kernel_cuda, "rmsnorm")


def load_ops() -> str:
    """Registers the ops once per process; returns where they came from (a path, or a note).
    Raises ImportError when there is nothing to load, RuntimeError when a JIT build fails."""
    if registered():
        return "registered before import"
    spec = importlib.util.find_spec("sgl_kernel_cuda._C")
    if spec is not None and spec.origin:
        try:
            torch.ops.load_library(spec.origin)
        except OSError as e:  # built against another torch or CUDA
            raise ImportError(f"sgl_kernel_cuda: cannot load {spec.origin}: {e}") from e
        return spec.origin
    if os.environ.get(JIT_ENV, "0") == "1":
        return jit_build()
    raise ImportError(
        f"sgl_kernel_cuda: the CUDA extension is not built (on a CUDA machine: `{BUILD_HINT}`, "
        f"or set {JIT_ENV}=1 to build it on import)"
    )


def jit_build() -> str:
    """Compiles csrc/cuda with torch.utils.cpp_extension.load (ninja; MAX_JOBS parallel jobs;
    cached under TORCH_EXTENSIONS_DIR, so a second process only loads it) and registers it."""
    if torch.version.cuda is None:
        raise ImportError(f"{JIT_ENV}=1, but torch {torch.__version__} is built without CUDA")
    missing = [str(p) for p in _build.sources() if not p.is_file()]
    if missing:
        raise ImportError(f"{JIT_ENV}=1 needs a sgl-kernel source checkout; missing {missing}")
    if _build.use_cuda_home() is None:
        raise ImportError(f"{JIT_ENV}=1, but no CUDA toolkit was found (no nvcc, no CUDA_HOME)")
    from torch.utils import cpp_extension

    logger.info("sgl_kernel_cuda: JIT-building %s (once; cached afterwards)", _build.CSRC)
    cpp_extension.load(
        name=JIT_NAME,
        sources=[str(p) for p in _build.sources()],
        extra_cflags=_build.cxx_flags(),
        extra_cuda_cflags=_build.nvcc_flags(),
        is_python_module=False,
    )
    return f"JIT build of {_build.CSRC}"
