"""Compiles the FlashInfer modules the device check uses, here, ahead of time (sm_90a), into
benchmarks/gpu/carry/flashinfer_aot/<name>/<name>.so, where device_check.sh installs them as
FlashInfer's AOT modules: the lent GPU machine then loads them instead of spending a minute or
more of its short time compiling. Modules not found there are JIT-compiled there as usual.

    bash benchmarks/gpu/prepare_carry.sh      # first: FlashInfer's files
    python benchmarks/gpu/flashinfer_aot.py   # ~10 min on 2 cores; needs nvcc (CUDA 13), no GPU

The modules: bf16 paged decode and fa2 paged prefill for head dims 64 (Llama-3.2-1B, the GPU
tests' model) and 128 (Llama-3.1-8B, the attention tests).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CARRY = HERE / "carry"


def stub_libcuda(folder: Path) -> None:
    """An empty libcuda.so (soname libcuda.so.1) to link against on a machine without a GPU
    driver; at load time the real driver library of that name is found."""
    subprocess.run(
        ["gcc", "-shared", "-o", str(folder / "libcuda.so"), "-Wl,-soname,libcuda.so.1",
         "-x", "c", "/dev/null"],
        check=True,
    )  # fmt: skip


def main() -> None:
    site = Path(tempfile.mkdtemp())
    with tarfile.open(CARRY / "flashinfer.tar.xz") as tar:
        tar.extractall(site, filter="data")
    # FlashInfer's imports, for this machine's Python (the carried wheel is the device's).
    tvm_ffi = next(CARRY.glob("apache_tvm_ffi-*.whl")).name.split("-")[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            f"apache-tvm-ffi=={tvm_ffi}",
            "nvidia-ml-py",
        ],
        check=True,
    )
    nvcc = shutil.which("nvcc")
    assert nvcc, "nvcc is needed"
    cuda_home = Path(os.path.realpath(nvcc)).parents[1]
    if not (cuda_home / "lib64").is_dir():  # a wrapper script: ask it where it lives
        found = re.search(r"(/\S+)/bin/nvcc", Path(nvcc).read_text())
        assert found, f"{nvcc} names no CUDA tree"
        cuda_home = Path(found.group(1))
    links = Path(tempfile.mkdtemp())
    stub_libcuda(links)
    (links / "libcudart.so").symlink_to(cuda_home / "lib64" / "libcudart.so")
    env = {
        **os.environ,
        "CUDA_HOME": str(cuda_home),
        "FLASHINFER_CUDA_ARCH_LIST": "9.0a",
        "FLASHINFER_EXTRA_LDFLAGS": f"-L{links}",
        "PYTHONPATH": str(site),
        "FLASHINFER_WORKSPACE_BASE": str(site / "ws"),
    }
    build = """
import sys, torch
from flashinfer.jit.attention.modules import gen_batch_decode_module, gen_batch_prefill_module
bf16, i32 = torch.bfloat16, torch.int32
for d in (64, 128):
    for spec in (gen_batch_decode_module(bf16, bf16, bf16, i32, d, d, 0, False, False),
                 gen_batch_prefill_module("fa2", bf16, bf16, bf16, i32, d, d, 0, False, False, False)):
        spec.build()
        print(spec.name, flush=True)
"""
    subprocess.run([sys.executable, "-c", build], env=env, check=True)
    out = CARRY / "flashinfer_aot"
    for so in (site / "ws").rglob("*.so"):
        name = so.stem
        (out / name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(so, out / name / so.name)
        print(f"{name}: {so.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
