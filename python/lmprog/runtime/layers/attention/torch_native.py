"""Paged attention in plain torch: the CPU backend and the reference for the GPU ones.

All requests of a step are handled together by padding them into a [B, max_len] grid; no Python
loop runs over layers x requests. Per step, `init_forward_metadata` builds (once, for all layers):

    kv_index [B, max_kv]   KV slot of each cached position (padding -> slot 0, the padding page)
    mask                   which keys each query may see (causal over prefix + new tokens)
    q_index  [B, max_ext]  row of each request's new tokens in the flattened [T] tokens (extend)

Padded queries are computed and dropped; padded keys are masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmprog.runtime.layers.attention.base import AttentionBackend, RadixAttention
from lmprog.runtime.model_executor.forward_batch import ForwardBatch


@dataclass
class _Metadata:
    kv_index: torch.Tensor | None  # [B, max_kv] (None in encode mode: no cache is read)
    mask: torch.Tensor  # decode: additive [B, 1, 1, max_kv]; extend/encode: bool [B, 1, Q, K]
    q_index: torch.Tensor | None  # [B, max_ext] rows into the flattened tokens (+1 pad row)
    q_valid: torch.Tensor | None  # [B, max_ext] bool, real (non-padded) queries


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
        visible = _grid(fb.seq_lens, max_kv)
        mask = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
        mask.masked_fill_(~visible, float("-inf"))
        return _Metadata(self._kv_index(fb, max_kv), mask[:, None, None, :], None, None)

    def _extend_metadata(self, fb: ForwardBatch) -> _Metadata:
        ext = fb.extend_seq_lens
        max_ext = max(fb.extend_seq_lens_cpu)
        q_valid = _grid(ext, max_ext)
        starts = torch.cumsum(ext, 0) - ext
        # Padded queries point at row T, a zero row appended to q at run time.
        q_index = torch.where(
            q_valid, starts[:, None] + torch.arange(max_ext, device=ext.device), fb.num_tokens
        )
        if fb.forward_mode.is_extend:
            max_kv = max(fb.seq_lens_cpu)
            # Query j of request i sits at position prefix_i + j and sees keys [0, prefix_i + j].
            q_pos = fb.extend_prefix_lens[:, None] + torch.arange(max_ext, device=ext.device)
            k_pos = torch.arange(max_kv, device=ext.device)
            mask = k_pos[None, None, :] <= q_pos[:, :, None]
            kv_index = self._kv_index(fb, max_kv)
        else:  # encode: every real token sees every real token of its sequence
            mask = q_valid[:, None, :].expand(-1, max_ext, -1).clone()
            kv_index = None
        # A padded query row with no visible key would give NaN: let it see key 0.
        mask[:, :, 0] |= ~q_valid
        return _Metadata(kv_index, mask[:, None], q_index, q_valid)

    @staticmethod
    def _pad_queries(q: torch.Tensor, md: _Metadata) -> torch.Tensor:
        """[T, H, D] -> [B, H, max_ext, D]."""
        q = torch.cat([q, q.new_zeros((1, *q.shape[1:]))])
        return q[md.q_index].transpose(1, 2)

    @staticmethod
    def _unpad(out: torch.Tensor, md: _Metadata) -> torch.Tensor:
        """[B, H, max_ext, D] -> [T, H * D] (row-major order of the valid grid is token order)."""
        out = out.transpose(1, 2)[md.q_valid]
        return out.reshape(out.shape[0], -1)

    def _gather_kv(
        self, layer: RadixAttention, fb: ForwardBatch, md: _Metadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, kv_heads, max_kv, D] keys and values of every cached position of the batch."""
        assert fb.token_to_kv_pool is not None and md.kv_index is not None
        k_buf, v_buf = fb.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        return k_buf[md.kv_index].transpose(1, 2), v_buf[md.kv_index].transpose(1, 2)

    def forward_extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        fb, md = forward_batch, forward_batch.attn_metadata
        assert fb.token_to_kv_pool is not None
        fb.token_to_kv_pool.set_kv_buffer(layer.layer_id, fb.out_cache_loc, k, v)
        keys, values = self._gather_kv(layer, fb, md)
        out = F.scaled_dot_product_attention(
            self._pad_queries(q, md), keys.to(q.dtype), values.to(q.dtype), attn_mask=md.mask,
            scale=layer.scaling, enable_gqa=layer.num_heads != layer.num_kv_heads,
        )
        return self._unpad(out, md)

    def forward_encode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        md = forward_batch.attn_metadata
        out = F.scaled_dot_product_attention(
            self._pad_queries(q, md), self._pad_queries(k, md), self._pad_queries(v, md),
            attn_mask=md.mask, scale=layer.scaling,
            enable_gqa=layer.num_heads != layer.num_kv_heads,
        )
        return self._unpad(out, md)

    def forward_decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        fb, md = forward_batch, forward_batch.attn_metadata
        assert fb.token_to_kv_pool is not None
        fb.token_to_kv_pool.set_kv_buffer(layer.layer_id, fb.out_cache_loc, k, v)
        keys, values = self._gather_kv(layer, fb, md)  # [B, Hkv, L, D]
        b, hkv = keys.shape[0], layer.num_kv_heads
        # Grouped-query attention without repeating K/V: the query heads of one KV head form
        # the rows of one small matmul ([G, D] x [D, L]).
        qg = q.view(b, hkv, layer.num_heads // hkv, layer.head_dim)
        scores = torch.matmul(qg, keys.to(q.dtype).transpose(-1, -2)) * layer.scaling
        probs = torch.softmax(scores + md.mask, dim=-1)
        out = torch.matmul(probs, values.to(q.dtype))  # [B, Hkv, G, Dv]
        return out.reshape(b, layer.num_heads * layer.v_head_dim)
