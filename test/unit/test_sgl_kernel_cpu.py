"""sgl_kernel's CPU ops against their torch references, on every ISA path this machine has.

The ISA is fixed once per process, so the lower paths (forced with LMPROG_CPU_ISA) run this file
as a script in a subprocess; the test process checks the best path itself.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

sgl_kernel = pytest.importorskip("sgl_kernel", reason="sgl_kernel is not built (scripts/setup.sh)")

ISA_ORDER = ["scalar", "avx2", "avx512", "amx"]


# ---- references --------------------------------------------------------------------------
def rmsnorm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """lmprog's RMSNorm torch path (HF's rounding in bf16)."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return w * normed


def attention_ref(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    slots: list[torch.Tensor],
    prefix: list[int],
    scale: float,
) -> torch.Tensor:
    """Each request's new tokens (q rows back to back) over its slots, causal, in float64."""
    outs, row = [], 0
    group = q.shape[1] // k_buf.shape[1]
    for s, p in zip(slots, prefix):
        n = len(s) - p
        qb = q[row : row + n].double().transpose(0, 1)  # [H, n, D]
        k = k_buf[s].double().repeat_interleave(group, 1).transpose(0, 1)  # [H, L, D]
        v = v_buf[s].double().repeat_interleave(group, 1).transpose(0, 1)
        scores = qb @ k.transpose(1, 2) * scale
        q_pos = torch.arange(p, p + n)[:, None]
        scores.masked_fill_(torch.arange(len(s))[None, :] > q_pos, -math.inf)
        outs.append((scores.softmax(-1) @ v).transpose(0, 1))
        row += n
    return torch.cat(outs).to(q.dtype)


# ---- inputs --------------------------------------------------------------------------------
def paged_batch(lens: list[int], page: int, kv_heads: int, d: int, dtype, seed: int):
    """A KV pool whose requests own shuffled pages (slot 0.. page-1 is the padding page)."""
    g = torch.Generator().manual_seed(seed)
    pages_each = [-(-n // page) for n in lens]
    num_pages = sum(pages_each) + 3
    order = (torch.randperm(num_pages - 1, generator=g) + 1).tolist()
    k_buf = torch.randn(num_pages * page, kv_heads, d, generator=g).to(dtype)
    v_buf = torch.randn(num_pages * page, kv_heads, d, generator=g).to(dtype)
    req_to_token = torch.zeros(len(lens) + 2, max(lens) + 5, dtype=torch.int64)
    rows = torch.randperm(len(lens) + 2, generator=g)[: len(lens)]
    slots = []
    for i, n in enumerate(lens):
        mine = torch.tensor(order[: pages_each[i]])
        del order[: pages_each[i]]
        s = (mine[:, None] * page + torch.arange(page)).flatten()[:n]
        req_to_token[rows[i], :n] = s
        slots.append(s)
    return k_buf, v_buf, req_to_token, rows, slots


ATTN_CASES = [
    # (lens, heads, kv_heads, d, page)
    ([1], 4, 4, 64, 1),
    ([15, 16, 17], 9, 3, 64, 16),
    ([100, 1, 37], 8, 2, 128, 1),
    ([300], 12, 3, 64, 16),
    ([5, 64, 65], 4, 1, 72, 1),  # head dim 72: the AVX2 width, not AVX-512's
    ([33, 7], 6, 3, 36, 1),  # head dim 36: scalar only
]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def check_decode(dtype: torch.dtype) -> None:
    for lens, heads, kv_heads, d, page in ATTN_CASES:
        k_buf, v_buf, r2t, rows, slots = paged_batch(lens, page, kv_heads, d, dtype, 0)
        q = torch.randn(len(lens), heads, d).to(dtype)
        out = torch.empty_like(q)
        scale = d**-0.5
        seq_lens = torch.tensor(lens)
        sgl_kernel.decode_attention(q, k_buf, v_buf, out, r2t, rows, seq_lens, scale)
        ref = attention_ref(q, k_buf, v_buf, slots, [n - 1 for n in lens], scale)
        torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


def check_extend(dtype: torch.dtype) -> None:
    for lens, heads, kv_heads, d, page in ATTN_CASES:
        prefixes = [n // 3 for n in lens]  # a cached third, then new tokens (1 when n is 1)
        k_buf, v_buf, r2t, rows, slots = paged_batch(lens, page, kv_heads, d, dtype, 1)
        total = sum(n - p for n, p in zip(lens, prefixes))
        q = torch.randn(total, heads, d).to(dtype)
        out = torch.empty_like(q)
        scale = d**-0.5
        sgl_kernel.extend_attention(
            q, k_buf, v_buf, out, r2t, rows, torch.tensor(lens), torch.tensor(prefixes), scale
        )
        ref = attention_ref(q, k_buf, v_buf, slots, prefixes, scale)
        torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


def check_norms(dtype: torch.dtype) -> None:
    for rows, n in ((1, 576), (5, 100), (3, 7), (17, 1536)):
        x = torch.randn(rows, n).to(dtype)
        w = torch.randn(n).to(dtype)
        # bf16: the same roundings as the torch layers, but the sum of squares may add up in
        # another order, which can move a result by one bf16 step.
        exact = dtype is torch.bfloat16
        tol = {"atol": 1e-2, "rtol": 1.6e-2} if exact else {"atol": 2e-6, "rtol": 2e-6}
        torch.testing.assert_close(sgl_kernel.rmsnorm(x, w, 1e-5), rmsnorm_ref(x, w, 1e-5), **tol)
        r = torch.randn(rows, n).to(dtype)
        xk, rk = x.clone(), r.clone()
        sgl_kernel.fused_add_rmsnorm(xk, rk, w, 1e-6)
        torch.testing.assert_close(rk, r + x, atol=0, rtol=0)
        torch.testing.assert_close(xk, rmsnorm_ref(r + x, w, 1e-6), **tol)
        gate_up = torch.randn(rows, 2 * n).to(dtype) * 4
        ref = F.silu(gate_up[:, :n]) * gate_up[:, n:]
        torch.testing.assert_close(
            sgl_kernel.silu_and_mul(gate_up), ref, atol=1e-5, rtol=2e-2 if exact else 1e-5
        )


def check_rope_store(dtype: torch.dtype) -> None:
    """rope_kv_store against lmprog's RotaryEmbedding.apply plus an indexed store."""
    from lmprog.runtime.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(64, 256, {"rope_type": "default", "rope_theta": 10000.0})
    for t, h, hkv in ((1, 9, 3), (5, 4, 4), (33, 8, 1)):
        positions = torch.randint(0, 200, (t,))
        rows = rope.rows(positions, dtype)
        qkv = torch.randn(t, (h + 2 * hkv) * 64).to(dtype)
        k_buf, v_buf = torch.zeros(50, hkv, 64, dtype=dtype), torch.zeros(50, hkv, 64, dtype=dtype)
        loc = torch.randperm(50)[:t]
        q, k = sgl_kernel.rope_kv_store(qkv, rows.cos32, rows.sin32, loc, k_buf, v_buf, h, hkv)
        heads = qkv.view(t, h + 2 * hkv, 64)
        q_ref = RotaryEmbedding.apply(heads[:, :h], rows.cos, rows.sin)
        k_ref = RotaryEmbedding.apply(heads[:, h : h + hkv], rows.cos, rows.sin)
        tol = {"atol": 1e-2, "rtol": 1e-2} if dtype is torch.bfloat16 else {}
        torch.testing.assert_close(q, q_ref, **tol)
        torch.testing.assert_close(k, k_ref, **tol)
        torch.testing.assert_close(k_buf[loc], k, atol=0, rtol=0)
        torch.testing.assert_close(v_buf[loc], heads[:, h + hkv :], atol=0, rtol=0)
        untouched = torch.ones(50, dtype=torch.bool)
        untouched[loc] = False
        assert not k_buf[untouched].any() and not v_buf[untouched].any()
    with pytest.raises(RuntimeError, match="outside the pool"):
        sgl_kernel.rope_kv_store(qkv, rows.cos32, rows.sin32, loc + 50, k_buf, v_buf, h, hkv)


def run_all() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        check_rope_store(dtype)
        check_norms(dtype)
        check_decode(dtype)
        check_extend(dtype)


# ---- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_match_the_torch_layers(dtype) -> None:
    check_norms(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_reads_the_pool_in_place(dtype) -> None:
    check_decode(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extend_attention_is_causal_over_prefix_and_new_tokens(dtype) -> None:
    check_extend(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_fused_with_the_kv_store(dtype) -> None:
    check_rope_store(dtype)


def test_one_long_stream_uses_every_thread_and_still_matches() -> None:
    """A single request of 5,000 tokens: its context is split across threads, then merged."""
    k_buf, v_buf, r2t, rows, slots = paged_batch([5000], 16, 3, 64, torch.float32, 2)
    q = torch.randn(1, 9, 64)
    out = torch.empty_like(q)
    sgl_kernel.decode_attention(q, k_buf, v_buf, out, r2t, rows, torch.tensor([5000]), 0.125)
    ref = attention_ref(q, k_buf, v_buf, slots, [4999], 0.125)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def run_on_isa(script: str, isa: str) -> None:
    """Runs a test file as a script with the kernels lowered to `isa`; it must print "<isa> ok".
    Skips when the CPU lacks the ISA."""
    best = sgl_kernel.detected_isa()
    if ISA_ORDER.index(isa) > ISA_ORDER.index(best):
        pytest.skip(f"this CPU offers {best}, not {isa}")
    env = dict(os.environ, LMPROG_CPU_ISA=isa)
    done = subprocess.run(
        [sys.executable, script],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"{isa} ok"


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_lower_isa_paths(isa: str) -> None:
    run_on_isa(__file__, isa)


def test_the_isa_is_reported_and_can_only_be_lowered() -> None:
    assert sgl_kernel.cpu_isa() in ISA_ORDER and sgl_kernel.detected_isa() in ISA_ORDER
    assert ISA_ORDER.index(sgl_kernel.cpu_isa()) <= ISA_ORDER.index(sgl_kernel.detected_isa())


def test_ops_trace_under_torch_compile() -> None:
    """Fake implementations let torch.compile trace the ops (no graph break needed)."""

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return sgl_kernel.silu_and_mul(sgl_kernel.rmsnorm(x, w, 1e-6))

    x, w = torch.randn(4, 64), torch.randn(64)
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w), f(x, w))


if __name__ == "__main__":
    run_all()
    print(f"{sgl_kernel.cpu_isa()} ok")
