"""A decode step through all decoder layers in one call: sgl_kernel's C++ DecodeStack.

Why: at one token per request each op of a layer runs for microseconds, and calling ~15 of them
per layer from Python costs about as much as the arithmetic (7.6 of a 14.7 ms step on SmolLM2
with `--quantization gguf`, benchmarks/README.md). The stack keeps the layers' weights on the C++
side and runs the same registered ops in the same order as the modules do, so a decode step
through it gives the same tensors as the module path.

It serves decode steps of the `cpu` attention backend for models whose layers it can express: the
Llama family without per-head q/k norms, with dense (the activation dtype), packed bf16, int8 or
gguf linear layers. Everything else runs the modules. LMPROG_DECODE_STACK=0 turns it off (for comparisons).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmprog.runtime.layers.attention.cpu import CpuAttnBackend
from lmprog.runtime.layers.attention.shared_prefix import SharedPrefixes
from lmprog.runtime.layers.kernels import cpu_kernels
from lmprog.runtime.layers.linear import FastLinear, onednn_linear_ok
from lmprog.runtime.layers.linear_bf16 import PackedBf16Linear
from lmprog.runtime.layers.quantization.gguf import GGUFLinear
from lmprog.runtime.layers.quantization.int8 import Int8Linear
from lmprog.runtime.layers.rotary import RopeRows
from lmprog.runtime.model_executor.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from lmprog.runtime.models.llama import LlamaModel

ENV = "LMPROG_DECODE_STACK"

# Kinds of sgl_kernel._C.stack_linear.
_DENSE, _DENSE_ONEDNN, _INT8, _GGUF, _BF16 = 0, 1, 2, 3, 4


def stack_enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def _stack_linear(kernels: Any, module: nn.Module, dtype: torch.dtype) -> Any | None:
    """The C++ description of one linear layer; None for a kind the stack does not run."""
    if isinstance(module, PackedBf16Linear):
        return kernels.stack_linear(_BF16, module.packed, None, module.bias, 0, module.out_features)
    if isinstance(module, Int8Linear):
        return kernels.stack_linear(_INT8, module.packed, module.scales, module.bias)
    if isinstance(module, GGUFLinear):
        return kernels.stack_linear(
            _GGUF,
            module.packed,
            None,
            module.bias,
            module.qtype,
            module.out_features,
            module.in_features,
        )
    if type(module) is FastLinear and module.weight.dtype == dtype:
        onednn = dtype == torch.float32 and onednn_linear_ok()
        kind = _DENSE_ONEDNN if onednn else _DENSE
        return kernels.stack_linear(kind, module.weight, None, module.bias)
    return None


class DecodeStack:
    """The C++ stack for one model; `forward(hidden, rope, fb)` replaces its layers' loop and
    final norm on a decode step. Build with `DecodeStack.build`, which returns None when the
    model has a part the stack does not run."""

    def __init__(self, stack: Any, dtype: torch.dtype) -> None:
        self._stack = stack
        self.dtype = dtype

    @classmethod
    def build(cls, model: LlamaModel) -> DecodeStack | None:
        kernels = cpu_kernels()
        if kernels is None or not hasattr(kernels._C, "DecodeStack"):
            return None
        layers = list(model.layers)
        dtype = model.norm.weight.dtype
        if not layers or dtype not in (torch.float32, torch.bfloat16):
            return None
        first = layers[0].self_attn
        eps = model.norm.eps
        stack = kernels._C.DecodeStack(
            first.num_heads, first.num_kv_heads, eps, first.attn.scaling, model.norm.weight
        )
        for layer in layers:
            attn = layer.self_attn
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if attn.qk_norm or any(norm.eps != eps for norm in norms):
                return None
            modules = (attn.qkv_proj, attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            linears = [_stack_linear(kernels._C, m, dtype) for m in modules]
            if any(lin is None for lin in linears):
                return None
            stack.add_layer(norms[0].weight, norms[1].weight, linears)
        return cls(stack, dtype)

    def applies(self, hidden: torch.Tensor, fb: ForwardBatch) -> bool:
        """Whether this step can run through the stack: a decode step of the cpu attention
        backend's kernels, in the stack's dtype, with a pool in that dtype."""
        pool = fb.token_to_kv_pool
        return (
            fb.forward_mode.is_decode
            and isinstance(fb.attn_backend, CpuAttnBackend)
            and hidden.dtype == self.dtype
            and hidden.device.type == "cpu"
            and pool is not None
            and pool.dtype == self.dtype
            and fb.req_to_token_pool is not None
        )

    def forward(self, hidden: torch.Tensor, rope: RopeRows, fb: ForwardBatch) -> torch.Tensor:
        """[B, hidden] embeddings -> [B, hidden] final-normed states; writes every layer's KV.
        `hidden` is overwritten (it becomes the residual stream)."""
        pool, rows = fb.token_to_kv_pool, fb.req_to_token_pool
        assert pool is not None and rows is not None
        # The cpu backend's decode metadata: shared-prefix groups for the cascade kernel, or None.
        groups: SharedPrefixes | None = fb.attn_metadata
        return self._stack.forward(
            hidden.contiguous(),
            rope.cos32,
            rope.sin32,
            fb.out_cache_loc,
            pool.k_buffer,
            pool.v_buffer,
            rows.req_to_token,
            fb.req_pool_indices,
            fb.seq_lens,
            None if groups is None else groups.group_of,
            None if groups is None else groups.prefix_lens,
        )
