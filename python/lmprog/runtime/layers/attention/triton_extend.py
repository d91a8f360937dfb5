"""Extend (prefill) attention over the paged KV pool in Triton (for the `triton` backend; issue 14).

Each request's new query tokens attend causally over all of its keys: the cached prefix, then the
new tokens themselves. Flash-attention style, one program per (request, query head, block of
BLOCK_M new tokens):

    keys of request b (positions)   0 ........ prefix-1 | prefix ........ seq_len-1
                                    cached prefix        | new tokens (queries, rows of q)
    new token j (row starts[b] + j) sits at position prefix + j and sees keys 0 .. prefix + j

The program walks its keys in blocks of BLOCK_N, from position 0 up to the causal frontier of its
last row (blocks wholly past it are never loaded), keeping an online softmax (running max, sum
and an fp32 accumulator) per query row; one `tl.dot` gives a block's scores and another its
weighted values.

All keys come from the pool, read in place through `req_to_token` (no gather into a padded
tensor). SGLang's kernel instead reads the prefix from the pool and the new tokens from the
contiguous k/v of the step; we don't, because by the time the backend runs, the new K/V are in
the pool anyway (`AttentionBackend.forward` wrote them, or a fused rotary + store did), so one
loop over one index serves every key; the new tokens then see their K/V exactly as later steps
will (same pool dtype), and the kernel needs no k/v arguments. The cost is an indirect load for
the new keys too, which hits the same few pages the step just wrote.

Head dims: the kernel's tiles are padded to the next power of two, at least 16 (`tl.dot`'s
smallest K and N), with masked loads and stores, so any head_dim and v_head_dim work. fp32
inputs multiply in full fp32 (`input_precision="ieee"`, not TF32) so an fp32 model gets the
torch_native backend's numbers; fp16/bf16 inputs multiply in their dtype with fp32 accumulation.

Per-request row offsets (`starts`, the exclusive cumsum of extend_seq_lens) are built on the
device by the caller, once per step; the grid uses the host copy of the longest extend.

The torch reference is the torch_native backend (gather + SDPA). On CPU the kernel runs under
`TRITON_INTERPRET=1` on small shapes (test/unit/test_triton_extend.py); the interpreter cannot
`tl.dot` bfloat16 (triton-lang/triton#11584), so bf16 is only exercised on a GPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # lmprog runs without Triton
    triton = None


if triton is not None:

    @triton.jit
    def _extend_fwd(
        q,
        k_buffer,
        v_buffer,
        out,
        req_to_token,
        req_pool_indices,
        prefix_lens,
        extend_lens,
        starts,
        scale,
        q_stride_t,
        q_stride_h,
        k_stride_s,
        k_stride_h,
        v_stride_s,
        v_stride_h,
        o_stride_t,
        o_stride_h,
        row_stride,
        GROUP: tl.constexpr,
        D: tl.constexpr,
        DV: tl.constexpr,
        D_PAD: tl.constexpr,
        DV_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        first = tl.program_id(2) * BLOCK_M  # this block's first new token of request b
        n_new = tl.load(extend_lens + b)
        if first >= n_new:  # the grid is sized for the longest request
            return
        kv = h // GROUP
        prefix = tl.load(prefix_lens + b)
        start = tl.load(starts + b)
        row = tl.load(req_pool_indices + b)
        m = first + tl.arange(0, BLOCK_M)
        m_ok = m < n_new
        d = tl.arange(0, D_PAD)
        dv = tl.arange(0, DV_PAD)
        qb = tl.load(
            q + (start + m[:, None]) * q_stride_t + h * q_stride_h + d[None, :],
            mask=m_ok[:, None] & (d[None, :] < D),
            other=0.0,
        )
        q_pos = prefix + m
        # Keys past `hi` are in no row's view: the last row sits at position hi - 1.
        hi = prefix + tl.minimum(n_new, first + BLOCK_M)
        m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_run = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
        # NOTE: every row, padded ones too, sees key 0 in the first block, so m_run is finite
        # after it and exp(m_run - m_new) never meets -inf - -inf.
        for k0 in range(0, hi, BLOCK_N):
            n = k0 + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            slot = tl.load(req_to_token + row * row_stride + n, mask=n_ok, other=0)
            kb = tl.load(
                k_buffer + slot[:, None] * k_stride_s + kv * k_stride_h + d[None, :],
                mask=n_ok[:, None] & (d[None, :] < D),
                other=0.0,
            ).to(qb.dtype)
            s = tl.dot(qb, tl.trans(kb), input_precision=PRECISION) * scale
            visible = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_run, tl.max(s, axis=1))
            alpha = tl.exp(m_run - m_new)
            p = tl.exp(s - m_new[:, None])
            vb = tl.load(
                v_buffer + slot[:, None] * v_stride_s + kv * v_stride_h + dv[None, :],
                mask=n_ok[:, None] & (dv[None, :] < DV),
                other=0.0,
            ).to(qb.dtype)
            pv = tl.dot(p.to(qb.dtype), vb, input_precision=PRECISION)
            acc = acc * alpha[:, None] + pv
            l_run = l_run * alpha + tl.sum(p, axis=1)
            m_run = m_new
        o = acc / l_run[:, None]
        tl.store(
            out + (start + m[:, None]) * o_stride_t + h * o_stride_h + dv[None, :],
            o.to(out.dtype.element_ty),
            mask=m_ok[:, None] & (dv[None, :] < DV),
        )


def _tile(dim: int) -> int:
    """The kernel's tile width for a head dim: the next power of two, at least 16."""
    return max(16, 1 << (dim - 1).bit_length())


def extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    starts: torch.Tensor,
    max_extend: int,
    scale: float,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """Causal attention of each request's new tokens over its prefix and themselves -> [T, H, Dv].

    q [T, H, D]: the new tokens of all requests, request by request; request b's rows start at
    `starts[b]` and number `extend_lens[b]` (<= `max_extend`, a host int). Its keys are positions
    0 .. prefix_lens[b] + extend_lens[b] - 1, in slots `req_to_token[req_pool_indices[b]]` of
    the buffers [slots, kv_heads, D or Dv], new tokens' K/V included. Block sizes must be powers
    of two, at least 16.
    """
    assert triton is not None, "the Triton extend kernel needs Triton"
    t, heads, d = q.shape
    kv_heads, dv = k_buffer.shape[1], v_buffer.shape[2]
    assert heads % kv_heads == 0, f"{heads} query heads, {kv_heads} kv heads"
    assert k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1, "buffers' head dim is strided"
    if q.stride(2) != 1:
        q = q.contiguous()
    out = q.new_empty((t, heads, dv))
    if t == 0:
        return out
    grid = (len(extend_lens), heads, triton.cdiv(max_extend, block_m))
    _extend_fwd[grid](
        q,
        k_buffer,
        v_buffer,
        out,
        req_to_token,
        req_pool_indices,
        prefix_lens,
        extend_lens,
        starts,
        scale,
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        out.stride(0),
        out.stride(1),
        req_to_token.stride(0),
        GROUP=heads // kv_heads,
        D=d,
        DV=dv,
        D_PAD=_tile(d),
        DV_PAD=_tile(dv),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else None,  # None: the default
    )
    return out
