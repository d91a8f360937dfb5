"""How the CUDA extension is compiled: its sources, compiler flags and the CUDA toolkit.

Shared by setup.py (which loads this file by path) and the JIT loader, so both build the same
thing. Imports nothing from torch: `torch.utils.cpp_extension` reads CUDA_HOME once, when it is
first imported, so `use_cuda_home()` must run before that.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# sgl-kernel/csrc/cuda in a source checkout (this file is sgl-kernel/python/sgl_kernel_cuda/).
CSRC = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
ARCH_ENV = "SGL_KERNEL_CUDA_ARCH"
DEFAULT_ARCH = "90a"  # H100 / H200, with Hopper's arch-specific instructions


def kernel_sources(csrc: Path = CSRC) -> list[Path]:
    """The .cu files: kernels and their launchers, no torch headers."""
    return sorted(csrc.glob("*.cu"))


def sources(csrc: Path = CSRC) -> list[Path]:
    """Everything the extension compiles: the kernels and the torch binding (ops.cpp)."""
    return [*kernel_sources(csrc), csrc / "ops.cpp"]


def arch_flags() -> list[str]:
    """nvcc's -gencode flags from SGL_KERNEL_CUDA_ARCH ("90a", or a list such as "90a;100a";
    "9.0a" is read as "90a"). Without it: none when TORCH_CUDA_ARCH_LIST is set (torch then adds
    its own flags from that), else sm_90a."""
    archs = os.environ.get(ARCH_ENV, "").strip()
    if not archs:
        if os.environ.get("TORCH_CUDA_ARCH_LIST"):
            return []
        archs = DEFAULT_ARCH
    flags = []
    for arch in re.split(r"[;, ]+", archs):
        arch = arch.replace(".", "").lower()
        if not re.fullmatch(r"\d+[af]?", arch):
            raise ValueError(f"{ARCH_ENV}={archs!r}: {arch!r} is not an arch such as 90a or 100a")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def nvcc_flags() -> list[str]:
    # No --use_fast_math: expf, division and the roundings must match torch's (see common.cuh).
    return ["-O3", *arch_flags()]


def cxx_flags() -> list[str]:
    return ["-O3"]


def _has_headers(root: Path) -> bool:
    return (root / "include" / "cuda_runtime_api.h").is_file()


def _nvcc_top(nvcc: str) -> Path | None:
    """The toolkit root nvcc itself reports (its `TOP` in a dry run): the real tree even when
    `nvcc` on PATH is a wrapper script elsewhere."""
    try:
        run = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", run.stdout + run.stderr, re.MULTILINE)
    return Path(os.path.realpath(match.group(1).strip())) if match else None


def cuda_home() -> Path | None:
    """The CUDA toolkit's root: $CUDA_HOME (or $CUDA_PATH); else the tree of `nvcc` on PATH,
    following a wrapper script (torch would take the wrapper's grandparent folder, which has no
    CUDA headers or libraries); else /usr/local/cuda. None when no toolkit is found."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return Path(env)
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        root = Path(os.path.realpath(nvcc)).parents[1]
        if _has_headers(root):
            return root
        top = _nvcc_top(nvcc)
        if top is not None and _has_headers(top):
            return top
    default = Path("/usr/local/cuda")
    return default if _has_headers(default) else None


def use_cuda_home() -> Path | None:
    """Points torch's extension builder at the real toolkit: sets CUDA_HOME when it is unset and
    corrects `torch.utils.cpp_extension.CUDA_HOME` when that module was imported with a toolkit
    path that has no headers. Returns the toolkit root (None: no toolkit)."""
    root = cuda_home()
    if root is None:
        return None
    os.environ.setdefault("CUDA_HOME", str(root))
    builder = sys.modules.get("torch.utils.cpp_extension")
    stale = getattr(builder, "CUDA_HOME", None)
    if stale and not _has_headers(Path(stale)):
        builder.CUDA_HOME = str(root)  # NOTE: read at import; the builder's later calls see this
    return root
