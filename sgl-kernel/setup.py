"""Builds lmprog's kernels as torch extensions: `sgl_kernel` (C++ for CPUs, csrc/cpu/) and,
where torch has CUDA, `sgl_kernel_cuda` (csrc/cuda/).

    pip install --no-build-isolation -e sgl-kernel     # (scripts/setup.sh does this)

Every CPU kernel is compiled once for the baseline x86-64 ISA, with its AVX2 and AVX-512 (and AMX)
variants in the same object under `#pragma GCC target(...)`; which one runs is chosen at run time
from what the CPU and the OS allow (csrc/cpu/isa.cpp). So a wheel built on one machine runs on any
x86-64 machine, and a build never assumes the CPU it was built on.

Which extensions are built, by SGL_KERNEL_BUILD:

    auto   (default) the CPU extension; the CUDA one too when torch has CUDA (torch.version.cuda)
           and a CUDA toolkit is found. On a CPU-only torch: the CPU extension alone.
    cpu    the CPU extension only
    cuda   the CUDA extension only; an error without CUDA. What a GPU machine short of time wants:
           the CPU extension takes minutes, the CUDA one well under one with MAX_JOBS=16
    all    both; an error without CUDA

The CUDA kernels are compiled for SGL_KERNEL_CUDA_ARCH (default 90a: H100/H200; a list such as
"90a;100a" builds each). Without it, a set TORCH_CUDA_ARCH_LIST chooses, through torch's flags.
The toolkit is $CUDA_HOME, else the one behind `nvcc` on PATH (sgl_kernel_cuda/_build.py).

On a GPU machine, only the CUDA ops, in place, without pip:

    cd sgl-kernel && SGL_KERNEL_BUILD=cuda MAX_JOBS=16 python setup.py build_ext --inplace

then put sgl-kernel/python on PYTHONPATH (`import sgl_kernel_cuda`), or skip the build and import
with SGL_KERNEL_CUDA_JIT=1 (the package compiles the sources on first import).
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os

import torch
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_ENV = "SGL_KERNEL_BUILD"
BUILD_CHOICES = ("auto", "cpu", "cuda", "all")


@functools.cache
def _load_cuda_build_config():
    """sgl_kernel_cuda/_build.py, loaded by path: importing the package would load its ops."""
    path = os.path.join(ROOT, "python", "sgl_kernel_cuda", "_build.py")
    spec = importlib.util.spec_from_file_location("sgl_kernel_cuda_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wanted() -> tuple[bool, bool]:
    """(build the CPU extension, build the CUDA extension), from SGL_KERNEL_BUILD."""
    choice = os.environ.get(BUILD_ENV, "auto").strip().lower() or "auto"
    if choice not in BUILD_CHOICES:
        raise SystemExit(f"{BUILD_ENV}={choice!r}: expected one of {', '.join(BUILD_CHOICES)}")
    if choice == "cpu":
        return True, False
    cuda_build = _load_cuda_build_config()
    # Before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
    toolkit = cuda_build.use_cuda_home() if torch.version.cuda else None
    if choice == "auto":
        if torch.version.cuda and toolkit is None:
            print(
                f"sgl-kernel: torch has CUDA {torch.version.cuda} but no CUDA toolkit was found; "
                "building the CPU extension only"
            )
        return True, toolkit is not None
    if toolkit is None:
        why = f"torch {torch.__version__} has no CUDA" if not torch.version.cuda else "no toolkit"
        raise SystemExit(f"{BUILD_ENV}={choice} asks for the CUDA extension, but {why}")
    return choice == "all", True


def cpu_extension():
    from torch.utils.cpp_extension import CppExtension

    return CppExtension(
        "sgl_kernel._C",
        sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))),
        extra_compile_args=["-O3", "-fopenmp", "-Wno-unknown-pragmas"],
        extra_link_args=["-fopenmp"],
    )


def cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    cuda_build = _load_cuda_build_config()
    return CUDAExtension(
        "sgl_kernel_cuda._C",
        [os.path.relpath(p, ROOT) for p in cuda_build.sources()],
        extra_compile_args={"cxx": cuda_build.cxx_flags(), "nvcc": cuda_build.nvcc_flags()},
    )


def main() -> None:
    from torch.utils.cpp_extension import BuildExtension

    with_cpu, with_cuda = _wanted()
    ext_modules = []
    if with_cpu:
        ext_modules.append(cpu_extension())
    if with_cuda:
        ext_modules.append(cuda_extension())
    setup(
        name="sgl_kernel",
        version="0.1.0",
        description="lmprog's kernels: CPU (paged attention, fused norms, quantized linear "
        "layers) and CUDA (fused norms, activation, rotary + KV store)",
        package_dir={"": "python"},
        packages=["sgl_kernel", "sgl_kernel_cuda"],
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        python_requires=">=3.10",
    )


main()
