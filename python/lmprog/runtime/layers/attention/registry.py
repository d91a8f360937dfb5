"""Attention backends by name, imported lazily so GPU-only backends cost nothing on CPU."""

from __future__ import annotations

import importlib

from lmprog.runtime.layers.attention.base import AttentionBackend

# name -> "module:Class"
_BACKENDS: dict[str, str] = {
    "torch_native": "lmprog.runtime.layers.attention.torch_native:TorchNativeAttnBackend",
}


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
