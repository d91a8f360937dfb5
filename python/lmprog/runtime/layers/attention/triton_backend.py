"""The `triton` attention backend: Triton kernels over the paged pool (issue 14).

Decode runs `triton_decode.decode_attention` (split-K over the context) and extend runs
`triton_extend.extend_attention` (flash-attention blocks, causal over prefix + new tokens); both
read every key from the pool in place through `req_to_token`. Encode (non-causal, no pool: BERT
embedders) stays on the torch_native path it inherits. Meant for GPUs; on CPU the kernels only
run under `TRITON_INTERPRET=1` (the tests' way to check them without a GPU).

Head dims must be powers of two: the decode kernel's block shapes are the head dims. The extend
kernel pads its tiles and would take any, but the backend refuses both modes alike, so a model it
cannot decode fails at its first prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmprog.runtime.layers.attention import triton_decode, triton_extend
from lmprog.runtime.layers.attention.base import RadixAttention
from lmprog.runtime.layers.attention.torch_native import TorchNativeAttnBackend
from lmprog.runtime.model_executor.forward_batch import ForwardBatch


@dataclass
class _ExtendMetadata:
    starts: torch.Tensor  # [B] first row of each request's new tokens in q (device cumsum)
    max_extend: int  # the longest extend of the step (host), for the grid


class TritonAttnBackend(TorchNativeAttnBackend):
    supports_cuda_graph = True  # decode reads only the batch's device tensors

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if triton_decode.triton is None:
            raise ValueError("attention_backend 'triton' needs the triton package")

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        if fb.forward_mode.is_decode:
            fb.attn_metadata = None  # the kernel reads the batch's own index tensors
        elif fb.forward_mode.is_extend:
            ext = fb.extend_seq_lens
            fb.attn_metadata = _ExtendMetadata(
                torch.cumsum(ext, 0) - ext, max(fb.extend_seq_lens_cpu, default=0)
            )
        else:
            super().init_forward_metadata(fb)

    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        fb, md = forward_batch, forward_batch.attn_metadata
        _check_head_dims(layer)
        pool, rows = fb.token_to_kv_pool, fb.req_to_token_pool
        assert pool is not None and rows is not None
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        out = triton_extend.extend_attention(
            q,
            k_buf,
            v_buf,
            rows.req_to_token,
            fb.req_pool_indices,
            fb.extend_prefix_lens,
            fb.extend_seq_lens,
            md.starts,
            md.max_extend,
            layer.scaling,
        )
        return out.view(q.shape[0], -1)

    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        fb = forward_batch
        _check_head_dims(layer)
        pool, rows = fb.token_to_kv_pool, fb.req_to_token_pool
        assert pool is not None and rows is not None
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        out = triton_decode.decode_attention(
            q, k_buf, v_buf, rows.req_to_token, fb.req_pool_indices, fb.seq_lens, layer.scaling
        )
        return out.view(q.shape[0], -1)


def _check_head_dims(layer: RadixAttention) -> None:
    for name, dim in (("head_dim", layer.head_dim), ("v_head_dim", layer.v_head_dim)):
        if dim & (dim - 1):
            raise ValueError(
                f"attention_backend 'triton' needs power-of-two head dims; {name} is {dim} "
                "(use torch_native)"
            )
