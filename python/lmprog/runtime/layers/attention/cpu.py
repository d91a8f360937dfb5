"""The CPU attention backend: sgl_kernel's paged attention, reading K/V from the pool in place.

Unlike `torch_native`, nothing is gathered or padded: the kernels walk each request's row of
`req_to_token` themselves, decode splits a long context across threads, and extend attends
causally over the cached prefix and the new tokens with an online softmax (bounded memory for any
prompt length). Encode (no KV) stays on the torch path, and so do extends of more than
`KERNEL_EXTEND_MAX` new tokens per request or over more than `KERNEL_EXTEND_CONTEXT` tokens of
context: there torch's gather + flash attention, which tiles Q.K^T into small matmuls, measured
faster than the extend kernel (about 2x at a 1,024-token prefill, 1.5x for 4 new tokens over 1,024;
benchmarks/README.md). The kernel serves short extends over short contexts (jump-forward tokens,
first turns), where it measured 1.4-3.4x faster.

Decode batches whose requests share a cached prefix (many questions behind one few-shot prompt)
run the cascade kernel: once per step `init_forward_metadata` finds the groups
(`shared_prefix.find_shared_prefixes`), and every layer then attends each group's prefix once for
all its members' queries instead of once per request. Groups need a prefix of at least
`CASCADE_MIN_PREFIX` tokens: there the cascade measured 1.15-1.4x the plain kernel for groups of
2 to 64 requests, and at 16 tokens 0.95-1.1x (SmolLM2 shapes, one thread). LMPROG_CASCADE=0 in
the environment turns the cascade off (for comparisons); the results are the same up to float
rounding either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from lmprog.runtime.layers.attention.base import RadixAttention
from lmprog.runtime.layers.attention.shared_prefix import SharedPrefixes, find_shared_prefixes
from lmprog.runtime.layers.attention.torch_native import TorchNativeAttnBackend
from lmprog.runtime.layers.kernels import cpu_kernels
from lmprog.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode

KERNEL_EXTEND_MAX = 16
KERNEL_EXTEND_CONTEXT = 512
CASCADE = os.environ.get("LMPROG_CASCADE", "1") != "0"
CASCADE_MIN_PREFIX = 32


class CpuAttnBackend(TorchNativeAttnBackend):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        kernels = cpu_kernels()
        if kernels is None:
            raise ValueError(
                "attention_backend 'cpu' needs the sgl_kernel package (bash scripts/setup.sh "
                "builds it) and LMPROG_CPU_ISA not 'torch'; or use 'torch_native'"
            )
        self.kernels = kernels

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        if self._torch_path(fb):
            super().init_forward_metadata(fb)
        elif fb.forward_mode.is_decode and CASCADE:
            assert fb.req_to_token_pool is not None
            fb.attn_metadata = find_shared_prefixes(
                fb.req_to_token_pool.req_to_token,
                fb.req_pool_indices,
                fb.seq_lens,
                CASCADE_MIN_PREFIX,
            )
        else:
            fb.attn_metadata = None  # the kernels read the batch's own index tensors

    @staticmethod
    def _torch_path(fb: ForwardBatch) -> bool:
        if fb.forward_mode is ForwardMode.ENCODE:
            return True
        return fb.forward_mode.is_extend and (
            max(fb.extend_seq_lens_cpu) > KERNEL_EXTEND_MAX
            or max(fb.seq_lens_cpu) > KERNEL_EXTEND_CONTEXT
        )

    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        fb = forward_batch
        if fb.attn_metadata is not None:  # a long extend: torch's flash attention
            return super().forward_extend(q, k, v, layer, fb)
        return self._run(self.kernels.extend_attention, q, k, v, layer, fb, fb.extend_prefix_lens)

    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        groups: SharedPrefixes | None = forward_batch.attn_metadata
        if groups is not None:
            kernel = self.kernels.cascade_decode_attention
            return self._run(
                kernel, q, k, v, layer, forward_batch, groups.group_of, groups.prefix_lens
            )
        return self._run(self.kernels.decode_attention, q, k, v, layer, forward_batch)

    @staticmethod
    def _run(
        kernel: Callable[..., None],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        fb: ForwardBatch,
        *extra: torch.Tensor,
    ) -> torch.Tensor:
        """Runs `kernel` over this layer's pool buffers in place (the new tokens' K/V are
        already there); returns [T, num_heads * v_head_dim]."""
        pool = fb.token_to_kv_pool
        assert pool is not None and fb.req_to_token_pool is not None
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        out = q.new_empty((q.shape[0], layer.num_heads, layer.v_head_dim))
        rows = fb.req_to_token_pool.req_to_token
        args = (rows, fb.req_pool_indices, fb.seq_lens, *extra, layer.scaling)
        kernel(q.contiguous(), k_buf, v_buf, out, *args)
        return out.view(q.shape[0], -1)
