"""Rotary embedding fused with the K/V store (csrc/cpu/rope.cpp).

Its torch reference is lmprog's `RotaryEmbedding.apply` followed by the pool's `set_kv_buffer`.
"""

from __future__ import annotations

import torch


def rope_kv_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    loc: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates the q and k heads of `qkv` [T, (H + 2 Hkv) D] by `cos`/`sin` (float32
    [T, D / 2], the rows of the tokens' positions), writes rotated k and plain v into
    `k_buf`/`v_buf` [slots, Hkv, D] at slots `loc` [T]; returns q [T, H, D] and k [T, Hkv, D]."""
    return torch.ops.sgl_kernel.rope_kv_store(
        qkv, cos, sin, loc, k_buf, v_buf, num_heads, num_kv_heads
    )


@torch.library.register_fake("sgl_kernel::rope_kv_store")
def _(qkv, cos, sin, loc, k_buf, v_buf, num_heads, num_kv_heads):
    t, d = qkv.shape[0], 2 * cos.shape[-1]
    return qkv.new_empty((t, num_heads, d)), qkv.new_empty((t, num_kv_heads, d))
