"""Builds sgl_kernel: lmprog's C++ kernels for CPUs, as a torch extension.

    pip install --no-build-isolation -e sgl-kernel     # (scripts/setup.sh does this)

Every kernel is compiled once for the baseline x86-64 ISA, with its AVX2 and AVX-512 (and AMX)
variants in the same object under `#pragma GCC target(...)`; which one runs is chosen at run time
from what the CPU and the OS allow (csrc/cpu/isa.cpp). So a wheel built on one machine runs on any
x86-64 machine, and a build never assumes the CPU it was built on.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))

setup(
    name="sgl_kernel",
    version="0.1.0",
    description="lmprog's CPU kernels (paged attention, fused norms, quantized linear layers)",
    package_dir={"": "python"},
    packages=["sgl_kernel"],
    ext_modules=[
        CppExtension(
            "sgl_kernel._C",
            sources,
            extra_compile_args=["-O3", "-fopenmp", "-Wno-unknown-pragmas"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
