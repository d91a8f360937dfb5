"""The GPU path's modules on a machine without CUDA: they import, the backends that need CUDA
refuse clearly, `auto` resolves as documented, and the new engine arguments are validated."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

from lmprog.runtime.layers.attention import create_attention_backend
from lmprog.runtime.layers.attention.registry import resolve_backend_name, supported_backends
from lmprog.runtime.server_args import ServerArgs

GPU_MODULES = [
    "lmprog.runtime.layers.attention.flashinfer_backend",
    "lmprog.runtime.layers.attention.triton_backend",
    "lmprog.runtime.layers.attention.triton_decode",
    "lmprog.runtime.layers.attention.triton_extend",
    "lmprog.runtime.layers.attention.paged_indices",
    "lmprog.runtime.model_executor.cuda_graph_runner",
    "lmprog.runtime.host_copy",
]


@pytest.mark.parametrize("module", GPU_MODULES)
def test_gpu_modules_import_without_cuda(module: str) -> None:
    importlib.import_module(module)


def test_flashinfer_backend_refuses_clearly_off_cuda() -> None:
    assert "flashinfer" in supported_backends()
    with pytest.raises(ValueError, match="flashinfer"):
        create_attention_backend(
            "flashinfer", num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32,
            device=torch.device("cpu"),
        )  # fmt: skip


def test_auto_backend_per_device() -> None:
    assert resolve_backend_name("auto", "cpu") in ("cpu", "torch_native")
    has = {m: importlib.util.find_spec(m) is not None for m in ("flashinfer", "triton")}
    want = "flashinfer" if has["flashinfer"] else "triton" if has["triton"] else "torch_native"
    assert resolve_backend_name("auto", "cuda") == want
    assert resolve_backend_name("triton", "cuda") == "triton"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cuda_graph_max_bs": 0}, "cuda_graph_max_bs must be >= 1 (or unset), got 0"),
        ({"load_format": "pt"}, "load_format must be one of auto, dummy, got 'pt'"),
    ],
)
def test_gpu_arguments_are_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServerArgs(model_path="x", **kwargs)
