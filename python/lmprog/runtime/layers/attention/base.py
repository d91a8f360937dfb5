"""The attention backend interface.

A backend owns how attention reads and writes the paged KV pool. Per step, the model runner calls
`init_forward_metadata(forward_batch)` once (index tables, masks: work shared by all layers), then
every attention layer calls `forward`, which dispatches on the batch's mode:

- extend: attend causally over the cached prefix plus the new tokens (prefill is extend with
  an empty prefix);
- decode: the same with one new token per request;
- encode: non-causal attention within each sequence over the given K/V only; nothing is cached.

Before extend and decode, `forward` writes the new tokens' K/V into the pool at `out_cache_loc`
(unless the caller already has: `save_kv_cache=False`, after a fused rotary + store), so the
mode methods find every key of the step in the pool. Inputs are `q` [T, num_heads, head_dim] and
`k`, `v` [T, num_kv_heads, head_dim] for the T new tokens; the output is
[T, num_heads * head_dim] in the same token order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from lmprog.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode


class AttentionBackend(ABC):
    """One implementation of paged attention (torch_native, triton, flashinfer, ...)."""

    # Decode steps can be captured in CUDA graphs (model_executor/cuda_graph_runner.py): the
    # layers' work reads only device tensors whose addresses stay fixed, and no host sync.
    supports_cuda_graph: bool = False

    def init_cuda_graph_state(self, max_bs: int, max_pages: int) -> None:
        """Allocates the static buffers captured decode steps read (graph backends only)."""

    def init_forward_metadata_graph(self, forward_batch: ForwardBatch) -> None:
        """`init_forward_metadata` for a padded decode batch of a captured batch size; runs
        before its capture and before every replay, outside the graph."""
        self.init_forward_metadata(forward_batch)

    @abstractmethod
    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Prepares per-step metadata into `forward_batch.attn_metadata`."""

    @abstractmethod
    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor: ...

    @abstractmethod
    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor: ...

    @abstractmethod
    def forward_encode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor: ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
    ) -> torch.Tensor:
        mode = forward_batch.forward_mode
        if save_kv_cache and mode is not ForwardMode.ENCODE:
            pool = forward_batch.token_to_kv_pool
            assert pool is not None, "ForwardBatch has no KV pool"
            pool.set_kv_buffer(layer.layer_id, forward_batch.out_cache_loc, k, v)
        if mode is ForwardMode.DECODE:
            return self.forward_decode(q, k, v, layer, forward_batch)
        if mode is ForwardMode.EXTEND:
            return self.forward_extend(q, k, v, layer, forward_batch)
        return self.forward_encode(q, k, v, layer, forward_batch)


class RadixAttention(nn.Module):
    """The attention layer models use: shapes and scaling here, the work in the step's backend."""

    def __init__(
        self,
        layer_id: int,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        scaling: float | None = None,
        v_head_dim: int | None = None,
    ) -> None:
        super().__init__()
        assert num_heads % num_kv_heads == 0, f"{num_heads} heads, {num_kv_heads} kv heads"
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.scaling = scaling if scaling is not None else head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
    ) -> torch.Tensor:
        """`save_kv_cache=False`: the new tokens' K/V are already in the pool."""
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.v_head_dim)
        backend = forward_batch.attn_backend
        assert backend is not None, "ForwardBatch has no attention backend"
        return backend.forward(q, k, v, self, forward_batch, save_kv_cache)
