"""Paged attention over lmprog's KV pool, read in place (csrc/cpu/attention.cpp).

    slots of request b = req_to_token[req_pool_indices[b], :seq_lens[b]]
    k_buffer, v_buffer = [num_slots, kv_heads, head_dim]  (one layer's pool)

The torch reference is lmprog's `torch_native` attention backend (gather, then SDPA).
"""

from __future__ import annotations

import torch


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    out: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> None:
    """out[b] = softmax(q[b] . K_b^T * scale) V_b for q [B, H, D], out [B, H, Dv]; each request's
    context is split across threads when there are fewer requests than threads can use."""
    torch.ops.sgl_kernel.decode_attention(
        q, k_buffer, v_buffer, out, req_to_token, req_pool_indices, seq_lens, scale
    )


def extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    out: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_prefix_lens: torch.Tensor,
    scale: float,
) -> None:
    """Causal attention of each request's new tokens (q [T, H, D], requests back to back) over
    its cached prefix and themselves; their K/V must already be in the pool."""
    torch.ops.sgl_kernel.extend_attention(
        q,
        k_buffer,
        v_buffer,
        out,
        req_to_token,
        req_pool_indices,
        seq_lens,
        extend_prefix_lens,
        scale,
    )


@torch.library.register_fake("sgl_kernel::decode_attention")
def _(q, k_buffer, v_buffer, out, req_to_token, req_pool_indices, seq_lens, scale) -> None:
    return None


@torch.library.register_fake("sgl_kernel::extend_attention")
def _(q, k_buffer, v_buffer, out, req_to_token, req_pool_indices, seq_lens, prefix, scale) -> None:
    return None
