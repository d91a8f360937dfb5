"""sgl_kernel_cuda: lmprog's CUDA kernels, registered as torch ops (`torch.ops.sgl_kernel_cuda.*`).

The same ops, with the same names and signatures, as sgl_kernel's CPU ones: `rmsnorm`,
`fused_add_rmsnorm`, `silu_and_mul`, `rope_kv_store` (ops.py), for float32, float16 and bfloat16
CUDA tensors. They launch on torch's current stream and never synchronize with the host, so they
can be captured in CUDA graphs; each has a fake implementation, for `torch.compile`.

A package of its own, apart from sgl_kernel, so that a GPU machine can build only these ops:

    cd sgl-kernel && SGL_KERNEL_BUILD=cuda MAX_JOBS=16 python setup.py build_ext --inplace

(see setup.py for SGL_KERNEL_BUILD and SGL_KERNEL_CUDA_ARCH), or build nothing and import with
SGL_KERNEL_CUDA_JIT=1, which compiles csrc/cuda on first import and caches the result (_load.py).
Importing raises ImportError when neither is there; nothing imports this package on a machine
without CUDA (lmprog asks for it only for CUDA tensors).
"""

from __future__ import annotations

from sgl_kernel_cuda._load import load_ops

source = load_ops()  # where the ops came from: the extension's path or a note

from sgl_kernel_cuda.ops import fused_add_rmsnorm, rmsnorm, rope_kv_store, silu_and_mul

__all__ = ["fused_add_rmsnorm", "rmsnorm", "rope_kv_store", "silu_and_mul", "source"]
