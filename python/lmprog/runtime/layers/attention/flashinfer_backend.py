"""The `flashinfer` attention backend: FlashInfer's paged kernels over lmprog's KV pool (GPUs).

    decode   BatchDecodeWithPagedKVCacheWrapper: one query per request over its pages;
    extend   BatchPrefillWithPagedKVCacheWrapper, causal: each request's new queries over every
             key of the request, the cached prefix and the new tokens alike (base.forward has
             written the new tokens' K/V into the pool already). FlashInfer aligns the causal
             mask to the bottom right when there are more keys than queries, which is exactly
             "new token j of request i, at position prefix_i + j, sees keys 0 .. prefix_i + j";
    encode   the torch_native path (encoders are small and keep no KV).

The pool needs no conversion: a layer's [slots, Hkv, D] buffer viewed as [pages, page_size, Hkv,
D] is FlashInfer's NHD paged layout. `init_forward_metadata` builds the step's page tables once
(paged_indices.py: a Triton kernel for the page ids, the host copies FlashInfer's `plan()` reads
from the host lengths, so no sync) and plans once; every layer then only calls `run()`.

CUDA graphs (cuda_graph_runner.py): each captured batch size gets its own decode wrapper in
FlashInfer's graph mode, whose index tensors are static buffers; before capture and before every
replay `init_forward_metadata_graph` refills those buffers and re-plans, outside the graph.

Both wrappers run FlashInfer's fa2 kernels, named rather than left to `auto`: on Hopper `auto`
picks fa3 for prefill, which takes minutes to JIT-compile on the lent GPU machine (fa2 well under
one), and may route decode to cuDNN, a library that machine may not have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmprog.runtime.layers.attention.base import AttentionBackend, RadixAttention
from lmprog.runtime.layers.attention.paged_indices import PagedKv, build_paged_kv_indices
from lmprog.runtime.layers.attention.torch_native import TorchNativeAttnBackend
from lmprog.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode

WORKSPACE_BYTES = 128 << 20  # FlashInfer's float scratch (split-K partial results), shared
KERNELS = "fa2"  # FlashInfer's own CUDA kernels, for decode and prefill alike


def import_flashinfer() -> Any:
    """The flashinfer module; a clear error when it is missing."""
    try:
        import flashinfer
    except ImportError as e:
        raise ValueError(
            "attention_backend 'flashinfer' needs the flashinfer-python package "
            f"({e}); use 'triton' or 'torch_native'"
        ) from e
    return flashinfer


@dataclass
class _Step:
    """What a step's layers read: the planned wrapper (its `run` takes q and the layer's pages)."""

    wrapper: Any
    pages: PagedKv


class FlashInferAttnBackend(AttentionBackend):
    supports_cuda_graph = True

    def __init__(
        self,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        page_size: int = 1,
        v_head_dim: int | None = None,
        scaling: float | None = None,
        **_: object,
    ) -> None:
        flashinfer = import_flashinfer()
        if torch.device(device).type != "cuda":
            raise ValueError("attention_backend 'flashinfer' runs on CUDA devices only")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim or head_dim
        self.dtype, self.device, self.page_size = dtype, torch.device(device), page_size
        self.scaling = scaling if scaling is not None else head_dim**-0.5
        # FlashInfer wants its scratch zeroed before first use.
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._flashinfer = flashinfer
        self.decode_wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend=KERNELS
        )
        self.prefill_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend=KERNELS
        )
        self.encode_backend = TorchNativeAttnBackend()
        self._graph_wrappers: dict[int, Any] = {}
        self._graph_indices: torch.Tensor | None = None
        self._graph_indptr: torch.Tensor | None = None
        self._graph_last: torch.Tensor | None = None

    # -- per-step planning ---------------------------------------------------------------

    def _pages(self, fb: ForwardBatch, indices_out: torch.Tensor | None = None) -> PagedKv:
        rows = fb.req_to_token_pool
        assert rows is not None, "ForwardBatch has no request-to-token pool"
        return build_paged_kv_indices(
            rows.req_to_token,
            fb.req_pool_indices,
            fb.seq_lens,
            fb.seq_lens_cpu,
            self.page_size,
            indices_out,
        )

    def _plan_decode(self, wrapper: Any, pages: PagedKv) -> None:
        wrapper.plan(
            pages.indptr_host,
            pages.indices,
            pages.last_page_len_host,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.page_size,
            sm_scale=self.scaling,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        if fb.forward_mode is ForwardMode.ENCODE:
            self.encode_backend.init_forward_metadata(fb)
            return
        pages = self._pages(fb)
        if fb.forward_mode.is_decode:
            self._plan_decode(self.decode_wrapper, pages)
            fb.attn_metadata = _Step(self.decode_wrapper, pages)
            return
        qo_indptr = torch.zeros(fb.batch_size + 1, dtype=torch.int32)
        qo_indptr[1:] = torch.tensor(fb.extend_seq_lens_cpu, dtype=torch.int32).cumsum(0)
        self.prefill_wrapper.plan(
            qo_indptr.pin_memory(),  # FlashInfer copies it to the device: without a sync
            pages.indptr_host,
            pages.indices,
            pages.last_page_len_host,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.page_size,
            head_dim_vo=self.v_head_dim,
            causal=True,
            sm_scale=self.scaling,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )
        fb.attn_metadata = _Step(self.prefill_wrapper, pages)

    # -- CUDA graphs -------------------------------------------------------------------

    def init_cuda_graph_state(self, max_bs: int, max_pages: int) -> None:
        """Static index buffers that every captured batch size's decode wrapper reads."""
        dev = self.device
        self._graph_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=dev)
        self._graph_last = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self._graph_indices = torch.zeros(max_pages, dtype=torch.int32, device=dev)

    def init_forward_metadata_graph(self, fb: ForwardBatch) -> None:
        """Plans a (padded) decode batch into its batch size's graph wrapper: before capture,
        and before every replay, outside the graph."""
        assert self._graph_indices is not None, "init_cuda_graph_state was not called"
        assert self._graph_indptr is not None and self._graph_last is not None
        bs = fb.batch_size
        wrapper = self._graph_wrappers.get(bs)
        if wrapper is None:
            wrapper = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace,
                "NHD",
                use_cuda_graph=True,
                paged_kv_indptr_buffer=self._graph_indptr[: bs + 1],
                paged_kv_indices_buffer=self._graph_indices,
                paged_kv_last_page_len_buffer=self._graph_last[:bs],
                backend=KERNELS,
            )
            self._graph_wrappers[bs] = wrapper
        pages = self._pages(fb, indices_out=self._graph_indices)
        self._plan_decode(wrapper, pages)
        fb.attn_metadata = _Step(wrapper, pages)

    # -- the layers' calls --------------------------------------------------------------

    def _run(self, q: torch.Tensor, layer: RadixAttention, fb: ForwardBatch) -> torch.Tensor:
        if layer.scaling != self.scaling:
            raise ValueError(
                f"layer {layer.layer_id} scales by {layer.scaling}, the backend was planned "
                f"with {self.scaling}"
            )
        pool = fb.token_to_kv_pool
        assert pool is not None, "ForwardBatch has no KV pool"
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        paged = (
            k_buf.view(-1, self.page_size, self.num_kv_heads, self.head_dim),
            v_buf.view(-1, self.page_size, self.num_kv_heads, self.v_head_dim),
        )
        out = fb.attn_metadata.wrapper.run(q.contiguous(), paged)
        return out.view(q.shape[0], -1)

    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        return self._run(q, layer, forward_batch)

    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        return self._run(q, layer, forward_batch)

    def forward_encode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        return self.encode_backend.forward_encode(q, k, v, layer, forward_batch)
