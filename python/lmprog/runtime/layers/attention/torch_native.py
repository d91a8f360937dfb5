"""Paged attention in plain torch: the CPU backend and the reference for the GPU ones.

All requests of a step are handled together by padding them into a [B, max_len] grid; no Python
loop runs over layers x requests. Per step, `init_forward_metadata` builds (once, for all layers):

    kv_index [B, max_kv]   KV slot of each cached position (padding -> slot 0, the padding page)
    mask                   which keys each query may see (causal over prefix + new tokens)
    q_index  [B, max_ext]  row of each request's new tokens in the flattened [T] tokens (extend)

Padded queries are computed and dropped; padded keys are masked out. Fast paths (same results):

- a single request needs no padding: q/k/v are viewed as [1, H, T, D] and nothing is gathered
  into a grid (`q_index is None`);
- an extend batch with no cached prefix (a plain prefill) attends over the new k/v directly with
  `is_causal=True` (`visible is None`): no gather from the pool, no mask tensor, and SDPA's CPU
  flash kernel skips the blocks above the diagonal (~30% faster at 1024 tokens). Causality is
  top-left aligned, which is right because query j and key j share position j.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmprog.runtime.layers.attention.base import AttentionBackend, RadixAttention
from lmprog.runtime.model_executor.forward_batch import ForwardBatch


@dataclass
class _Metadata:
    # [B, max_kv] (None when no cache is read: encode, and extend without a cached prefix)
    kv_index: torch.Tensor | None
    # bool [B, 1, Q, K] (Q = 1 in decode): which keys each query may see. None: no mask needed
    # (see the fast paths above). Layers read it through `mask(dtype)`.
    visible: torch.Tensor | None
    q_index: torch.Tensor | None  # [B, max_ext] rows into the flattened tokens (+1 pad row)
    q_valid: torch.Tensor | None  # [B, max_ext] bool, real (non-padded) queries
    causal: bool = False  # extend without a cached prefix: SDPA's is_causal over the new k/v
    # Gathered K and V of the current layer, reused by every layer of the step: one allocation
    # per step instead of two per layer (each is B x max_kv x kv_heads x head_dim, ~10 MB for
    # 64 requests of 200 tokens: fresh ones cost page faults each time).
    kv_scratch: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _additive: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)

    def mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """`visible` as an additive 0 / -inf mask in the query's dtype, built once per step.

        Additive rather than bool: SDPA would otherwise convert a bool mask in every layer. In
        the query's dtype because SDPA's cuDNN kernel (CUDA, torch 2.11) silently misreads a
        float32 mask under bf16 queries.
        """
        if self.visible is None:
            return None
        if dtype not in self._additive:
            mask = torch.zeros(self.visible.shape, dtype=dtype, device=self.visible.device)
            self._additive[dtype] = mask.masked_fill_(~self.visible, float("-inf"))
        return self._additive[dtype]


def _grid(lens: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] bool: column j < lens[i]."""
    return torch.arange(width, device=lens.device)[None, :] < lens[:, None]


class TorchNativeAttnBackend(AttentionBackend):
    def __init__(self, **_: object) -> None:
        pass

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        if fb.forward_mode.is_decode:
            fb.attn_metadata = self._decode_metadata(fb)
        else:
            fb.attn_metadata = self._extend_metadata(fb)

    def _kv_index(self, fb: ForwardBatch, max_kv: int) -> torch.Tensor:
        assert fb.req_to_token_pool is not None
        rows = fb.req_to_token_pool.req_to_token[fb.req_pool_indices, :max_kv]
        return torch.where(_grid(fb.seq_lens, max_kv), rows, 0)

    def _decode_metadata(self, fb: ForwardBatch) -> _Metadata:
        max_kv = max(fb.seq_lens_cpu)
        visible = _grid(fb.seq_lens, max_kv)[:, None, None, :]
        return _Metadata(self._kv_index(fb, max_kv), visible, None, None)

    def _extend_metadata(self, fb: ForwardBatch) -> _Metadata:
        no_prefix = not any(fb.extend_prefix_lens_cpu)
        if fb.batch_size == 1 and (no_prefix or not fb.forward_mode.is_extend):
            # One sequence, nothing cached: plain causal (extend) or full (encode) attention.
            return _Metadata(None, None, None, None, causal=fb.forward_mode.is_extend)
        ext = fb.extend_seq_lens
        max_ext = max(fb.extend_seq_lens_cpu)
        q_valid = _grid(ext, max_ext)
        starts = torch.cumsum(ext, 0) - ext
        # Padded queries point at row T, a zero row appended to q at run time.
        q_index = torch.where(
            q_valid, starts[:, None] + torch.arange(max_ext, device=ext.device), fb.num_tokens
        )
        if fb.forward_mode.is_extend and no_prefix:
            # Padded keys sit after every real key of their row, so top-left causality never
            # shows them to a real query; padded queries are dropped.
            return _Metadata(None, None, q_index, q_valid, causal=True)
        if fb.forward_mode.is_extend:
            max_kv = max(fb.seq_lens_cpu)
            # Query j of request i sits at position prefix_i + j and sees keys [0, prefix_i + j].
            q_pos = fb.extend_prefix_lens[:, None] + torch.arange(max_ext, device=ext.device)
            k_pos = torch.arange(max_kv, device=ext.device)
            visible = k_pos[None, None, :] <= q_pos[:, :, None]
            kv_index = self._kv_index(fb, max_kv)
        else:  # encode: every real token sees every real token of its sequence
            visible = q_valid[:, None, :].expand(-1, max_ext, -1).clone()
            kv_index = None
        # A padded query row with no visible key would give NaN: let it see key 0.
        visible[:, :, 0] |= ~q_valid
        return _Metadata(kv_index, visible[:, None], q_index, q_valid)

    @staticmethod
    def _pad_queries(q: torch.Tensor, md: _Metadata) -> torch.Tensor:
        """[T, H, D] -> [B, H, max_ext, D] (a view when there is one request)."""
        if md.q_index is None:
            return q[None].transpose(1, 2)
        q = torch.cat([q, q.new_zeros((1, *q.shape[1:]))])
        return q[md.q_index].transpose(1, 2)

    @staticmethod
    def _unpad(out: torch.Tensor, md: _Metadata) -> torch.Tensor:
        """[B, H, max_ext, D] -> [T, H * D] (row-major order of the valid grid is token order)."""
        out = out.transpose(1, 2)
        if md.q_valid is not None:
            out = out[md.q_valid]
        return out.reshape(-1, out.shape[-2] * out.shape[-1])

    def _gather_kv(
        self, layer: RadixAttention, fb: ForwardBatch, md: _Metadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, kv_heads, max_kv, D] keys and values of every cached position of the batch."""
        assert fb.token_to_kv_pool is not None and md.kv_index is not None
        k_buf, v_buf = fb.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        b, n = md.kv_index.shape
        flat = md.kv_index.view(-1)
        shapes = ((flat.numel(), *k_buf.shape[1:]), (flat.numel(), *v_buf.shape[1:]))
        if md.kv_scratch is None or (md.kv_scratch[0].shape, md.kv_scratch[1].shape) != shapes:
            md.kv_scratch = (k_buf.new_empty(shapes[0]), v_buf.new_empty(shapes[1]))
        keys, values = md.kv_scratch
        # index_select on the flat index is ~3x faster on CPU than advanced indexing
        # (k_buf[kv_index]); the transposes are views that SDPA reads through strides.
        torch.index_select(k_buf, 0, flat, out=keys)
        torch.index_select(v_buf, 0, flat, out=values)
        return (
            keys.view(b, n, *k_buf.shape[1:]).transpose(1, 2),
            values.view(b, n, *v_buf.shape[1:]).transpose(1, 2),
        )

    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        fb, md = forward_batch, forward_batch.attn_metadata
        if md.causal:  # nothing cached before this step: the new k/v are all the keys
            return self._attend(q, k, v, layer, md, is_causal=True)
        keys, values = self._gather_kv(layer, fb, md)
        out = F.scaled_dot_product_attention(
            self._pad_queries(q, md),
            keys.to(q.dtype),
            values.to(q.dtype),
            attn_mask=md.mask(q.dtype),
            scale=layer.scaling,
            enable_gqa=layer.num_heads != layer.num_kv_heads,
        )
        return self._unpad(out, md)

    def forward_encode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        return self._attend(q, k, v, layer, forward_batch.attn_metadata, is_causal=False)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        md: _Metadata,
        is_causal: bool,
    ) -> torch.Tensor:
        """Attention within each request's new tokens only (encode; prefill with no prefix)."""
        out = F.scaled_dot_product_attention(
            self._pad_queries(q, md),
            self._pad_queries(k, md),
            self._pad_queries(v, md),
            attn_mask=md.mask(q.dtype),
            is_causal=is_causal,
            scale=layer.scaling,
            enable_gqa=layer.num_heads != layer.num_kv_heads,
        )
        return self._unpad(out, md)

    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        fb, md = forward_batch, forward_batch.attn_metadata
        keys, values = self._gather_kv(layer, fb, md)  # [B, Hkv, L, D] strided views
        b = keys.shape[0]
        # SDPA's CPU kernel reads the gathered K/V through their strides (no transpose copy)
        # and handles grouped-query heads without repeating K/V.
        out = F.scaled_dot_product_attention(
            q[:, :, None],
            keys.to(q.dtype),
            values.to(q.dtype),
            attn_mask=md.mask(q.dtype),
            scale=layer.scaling,
            enable_gqa=layer.num_heads != layer.num_kv_heads,
        )  # [B, H, 1, Dv]
        return out.reshape(b, layer.num_heads * layer.v_head_dim)
