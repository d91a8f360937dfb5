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


def cascade_decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    out: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    group_of: torch.Tensor,
    group_prefix_lens: torch.Tensor,
    scale: float,
) -> None:
    """`decode_attention`'s result, with requests that share a prefix reading it once.

    group_of [B] int64: request b's shared-prefix group in [0, G), or -1 for none.
    group_prefix_lens [G] int64: P_g. The caller guarantees that every member of group g has the
    same first P_g slots; P_g < seq_lens[b] for each member is checked.

        request b:  | group's shared prefix [0, P_g) | own positions [P_g, seq_lens[b]) |
                      one pass for all members:        per request, as decode_attention
                      K/V read once, a small GEMM

    Each group's prefix is attended for all its members' queries at once (many requests behind
    one few-shot prompt re-read it once per request in plain decode); the pieces merge by
    log-sum-exp, so the result is decode_attention's up to float rounding.
    """
    torch.ops.sgl_kernel.cascade_decode_attention(
        q,
        k_buffer,
        v_buffer,
        out,
        req_to_token,
        req_pool_indices,
        seq_lens,
        group_of,
        group_prefix_lens,
        scale,
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


@torch.library.register_fake("sgl_kernel::cascade_decode_attention")
def _(
    q, k_buffer, v_buffer, out, req_to_token, pool_idx, seq_lens, group_of, prefix, scale
) -> None:
    return None
