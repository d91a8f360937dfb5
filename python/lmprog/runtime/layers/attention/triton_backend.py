"""The `triton` attention backend: Triton kernels over the paged pool (issue 14, in progress).

Decode runs `triton_decode.decode_attention` (split-K over the context, reading the pool in
place); extend and encode still run the torch_native path until the Triton extend kernel lands.
Meant for GPUs; on CPU the kernels only run under `TRITON_INTERPRET=1` (the tests' way to check
them without a GPU). Head dims must be powers of two (the kernels' block shapes).
"""

from __future__ import annotations

import torch

from lmprog.runtime.layers.attention import triton_decode
from lmprog.runtime.layers.attention.base import RadixAttention
from lmprog.runtime.layers.attention.torch_native import TorchNativeAttnBackend
from lmprog.runtime.model_executor.forward_batch import ForwardBatch


class TritonAttnBackend(TorchNativeAttnBackend):
    supports_cuda_graph = True  # decode reads only the batch's device tensors

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if triton_decode.triton is None:
            raise ValueError("attention_backend 'triton' needs the triton package")

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        if fb.forward_mode.is_decode:
            fb.attn_metadata = None  # the kernel reads the batch's own index tensors
        else:
            super().init_forward_metadata(fb)

    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        fb = forward_batch
        for name, dim in (("head_dim", layer.head_dim), ("v_head_dim", layer.v_head_dim)):
            if dim & (dim - 1):
                raise ValueError(
                    f"attention_backend 'triton' needs power-of-two head dims; {name} is {dim} "
                    "(use torch_native)"
                )
        pool, rows = fb.token_to_kv_pool, fb.req_to_token_pool
        assert pool is not None and rows is not None
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        out = triton_decode.decode_attention(
            q, k_buf, v_buf, rows.req_to_token, fb.req_pool_indices, fb.seq_lens, layer.scaling
        )
        return out.view(q.shape[0], -1)
