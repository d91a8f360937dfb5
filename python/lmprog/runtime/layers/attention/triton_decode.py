"""Decode attention over the paged KV pool in Triton (for the `triton` backend; issue 14).

One query token per request, over its whole context, read from the pool in place through
`req_to_token` (no gather). Split-K, as in flash-decoding, so that a few long requests still fill
the GPU:

    stage 1, grid (B, kv heads, splits): each program takes one request, the query heads that
        share one kv head (GQA: each key block is read once for all of them, their scores one
        small matmul) and one slice of the context; blocks of BLOCK_N keys give scores, an
        online softmax keeps the running max and sum, and the slice leaves (acc [Dv]
        normalized, lse) per head in a scratch buffer;
    stage 2, grid (B, H): the slices merge by log-sum-exp into out [B, H, Dv].

The torch reference is the torch_native backend (gather + SDPA). On CPU the kernels run under
`TRITON_INTERPRET=1` on small shapes (test/unit/test_triton_decode.py).
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
    def _decode_stage1(
        q,
        k_buffer,
        v_buffer,
        req_to_token,
        req_pool_indices,
        seq_lens,
        mid_acc,
        mid_lse,
        scale,
        row_stride,
        GROUP: tl.constexpr,
        BLOCK_H: tl.constexpr,
        KV_HEADS: tl.constexpr,
        D: tl.constexpr,
        DV: tl.constexpr,
        SPLITS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        kv = tl.program_id(1)
        s = tl.program_id(2)
        heads = KV_HEADS * GROUP
        n = tl.load(seq_lens + b)
        row = tl.load(req_pool_indices + b)
        per = (n + SPLITS - 1) // SPLITS
        lo = s * per
        hi = tl.minimum(n, lo + per)
        g = tl.arange(0, BLOCK_H)  # the query heads that share this kv head, padded
        in_group = g < GROUP
        head = kv * GROUP + g
        d = tl.arange(0, D)
        dv = tl.arange(0, DV)
        qb = tl.load(
            q + (b * heads + head[:, None]) * D + d[None, :], mask=in_group[:, None], other=0.0
        )
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, DV], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            valid = pos < hi
            slot = tl.load(req_to_token + row * row_stride + pos, mask=valid, other=0)
            # Each key block is read once for the whole group (GQA), not once per query head.
            kb = tl.load(
                k_buffer + (slot[:, None] * KV_HEADS + kv) * D + d[None, :],
                mask=valid[:, None],
                other=0.0,
            )
            score = tl.dot(qb, tl.trans(kb), input_precision=PRECISION) * scale
            score = tl.where(valid[None, :], score, float("-inf"))
            m_new = tl.maximum(m, tl.max(score, axis=1))
            p = tl.exp(score - m_new[:, None])
            alpha = tl.exp(m - m_new)
            vb = tl.load(
                v_buffer + (slot[:, None] * KV_HEADS + kv) * DV + dv[None, :],
                mask=valid[:, None],
                other=0.0,
            )
            pv = tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
            acc = acc * alpha[:, None] + pv
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            m = m_new
        base = (b * heads + head) * SPLITS + s
        tl.store(
            mid_acc + base[:, None] * DV + dv[None, :],
            acc / tl.maximum(l_sum, 1e-30)[:, None],
            mask=in_group[:, None],
        )
        # An empty slice (hi <= lo) leaves lse = -inf and weighs nothing in the merge.
        lse = tl.where(l_sum > 0, m + tl.log(tl.maximum(l_sum, 1e-30)), float("-inf"))
        tl.store(mid_lse + base, lse, mask=in_group)

    @triton.jit
    def _decode_stage2(
        mid_acc,
        mid_lse,
        out,
        HEADS: tl.constexpr,
        DV: tl.constexpr,
        SPLITS: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        base = (b * HEADS + h) * SPLITS
        sp = tl.arange(0, SPLITS)
        lse = tl.load(mid_lse + base + sp)
        w = tl.exp(lse - tl.max(lse, axis=0))
        dv = tl.arange(0, DV)
        acc = tl.load(mid_acc + (base + sp[:, None]) * DV + dv[None, :])
        o = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w, axis=0)
        tl.store(out + (b * HEADS + h) * DV + dv, o.to(out.dtype.element_ty))


def default_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Context slices per request: enough programs (batch x kv heads x splits) for about two
    per multiprocessor, at most 16. It depends on the batch shape only, never on the lengths,
    so a CUDA graph captured for a batch size stays right for every replay."""
    sms = (
        torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else 4
    )
    want = -(-2 * sms // max(1, batch * kv_heads))
    return min(16, triton.next_power_of_2(want))


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    splits: int | None = None,
    block_n: int = 32,
) -> torch.Tensor:
    """softmax(q . K^T * scale) V per request -> [B, H, Dv]; q [B, H, D], buffers
    [slots, kv_heads, D or Dv]. D, Dv and `splits` (default: `default_splits`) must be powers
    of two (Triton's aranges)."""
    assert triton is not None, "the Triton decode kernel needs Triton"
    b, heads, d = q.shape
    kv_heads, dv = k_buffer.shape[1], v_buffer.shape[2]
    out = q.new_empty((b, heads, dv))
    if b == 0:
        return out
    group = heads // kv_heads
    splits = splits or default_splits(b, kv_heads, q.device)
    mid_acc = torch.empty((b, heads, splits, dv), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((b, heads, splits), dtype=torch.float32, device=q.device)
    _decode_stage1[(b, kv_heads, splits)](
        q.contiguous(),
        k_buffer,
        v_buffer,
        req_to_token,
        req_pool_indices,
        seq_lens,
        mid_acc,
        mid_lse,
        scale,
        req_to_token.stride(0),
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),  # tl.dot's smallest tile
        KV_HEADS=kv_heads,
        D=d,
        DV=dv,
        SPLITS=splits,
        BLOCK_N=block_n,
        # fp32 models multiply in full fp32, not TF32 (as the extend kernel does).
        PRECISION="ieee" if q.dtype == torch.float32 else None,
    )
    _decode_stage2[(b, heads)](mid_acc, mid_lse, out, HEADS=heads, DV=dv, SPLITS=splits)
    return out
