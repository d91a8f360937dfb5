"""Attention backends by name, imported lazily so GPU-only backends cost nothing on CPU."""

from __future__ import annotations

import importlib
import importlib.util

from lmprog.runtime.layers.attention.base import AttentionBackend

# name -> "module:Class"
_BACKENDS: dict[str, str] = {
    "torch_native": "lmprog.runtime.layers.attention.torch_native:TorchNativeAttnBackend",
    "cpu": "lmprog.runtime.layers.attention.cpu:CpuAttnBackend",
    "triton": "lmprog.runtime.layers.attention.triton_backend:TritonAttnBackend",
    "flashinfer": "lmprog.runtime.layers.attention.flashinfer_backend:FlashInferAttnBackend",
}


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_backend_name(name: str, device: str) -> str:
    """`auto` is the best backend the device offers: on CPU, `cpu` when the kernels are there,
    else `torch_native`; on CUDA, `flashinfer` when it is installed, else `triton`, else
    `torch_native`."""
    if name != "auto":
        return name
    if device == "cpu":
        from lmprog.runtime.layers.kernels import cpu_kernels

        return "cpu" if cpu_kernels() is not None else "torch_native"
    if device == "cuda":
        for backend, module in (("flashinfer", "flashinfer"), ("triton", "triton")):
            if _importable(module):
                return backend
    return "torch_native"


def supported_backends() -> list[str]:
    return sorted(_BACKENDS)


def create_attention_backend(name: str, **kwargs: object) -> AttentionBackend:
    """Instantiates the backend called `name`; unknown names fail listing the supported ones."""
    if name not in _BACKENDS:
        raise ValueError(
            f"attention_backend {name!r} is not supported; choose one of {supported_backends()}"
        )
    module_name, cls_name = _BACKENDS[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**kwargs)
