"""The GPU attention backends (flashinfer, triton) against torch_native on random pools, in bf16.
Skipped on machines without CUDA; run on the lent GPU machine by benchmarks/gpu/device_check.sh."""

from __future__ import annotations

import pytest
import torch

from lmprog.runtime.layers.attention import create_attention_backend
from lmprog.runtime.layers.attention.base import RadixAttention
from lmprog.runtime.mem_cache.allocator import TokenToKVPoolAllocator
from lmprog.runtime.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPool
from lmprog.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
CUDA = torch.device("cuda")
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def step(page_size: int, prefix: list[int], extend: list[int], seed: int):
    """A pool whose requests hold `prefix` tokens of random K/V, and a step adding `extend`
    tokens each: (q, k, v, layer, forward batch, pools)."""
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    rows = ReqToTokenPool(len(prefix) + 1, 4096, CUDA)
    size = 8192
    pool = TokenToKVPool(size, page_size, 1, KV_HEADS, HEAD_DIM, torch.bfloat16, CUDA)
    alloc = TokenToKVPoolAllocator(size, page_size)
    slots = [rows.alloc() for _ in prefix]
    zeros = [0] * len(prefix)
    cached = alloc.alloc_extend(zeros, prefix, zeros)
    rows.write_runs(slots, zeros, prefix, cached)

    def rand(n: int, heads: int) -> torch.Tensor:
        return torch.randn(n, heads, HEAD_DIM, generator=gen, device=CUDA).to(torch.bfloat16)

    pool.set_kv_buffer(0, cached.to(CUDA), rand(len(cached), KV_HEADS), rand(len(cached), KV_HEADS))
    ends = [p + e for p, e in zip(prefix, extend)]
    last = [rows.last_slot(s, p) for s, p in zip(slots, prefix)]
    loc = alloc.alloc_extend(prefix, ends, last)
    rows.write_runs(slots, prefix, extend, loc)
    t = sum(extend)
    mode = ForwardMode.DECODE if set(extend) == {1} else ForwardMode.EXTEND
    fb = ForwardBatch.build(
        mode, [0] * t, slots, prefix, extend, loc, CUDA,
        req_to_token_pool=rows, token_to_kv_pool=pool,
    )  # fmt: skip
    layer = RadixAttention(0, HEADS, HEAD_DIM, KV_HEADS)
    return rand(t, HEADS), rand(t, KV_HEADS), rand(t, KV_HEADS), layer, fb


def attend(name: str, page_size: int, q, k, v, layer, fb) -> torch.Tensor:
    backend = create_attention_backend(
        name,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        dtype=torch.bfloat16,
        device=CUDA,
        page_size=page_size,
    )
    fb.attn_backend = backend
    backend.init_forward_metadata(fb)
    return backend.forward(q, k, v, layer, fb).float()


CASES = {
    "decode": ([0, 17, 300, 1023, 64], [1, 1, 1, 1, 1]),
    "decode_bs64_ctx1024": ([1023] * 64, [1] * 64),
    "prefill": ([0, 0, 0], [5, 130, 33]),
    "extend_over_prefix": ([17, 0, 300, 1000], [1, 64, 33, 200]),
}


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
def test_backend_matches_torch_native(backend: str, case: str, page_size: int) -> None:
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    prefix, extend = CASES[case]
    q, k, v, layer, fb = step(page_size, prefix, extend, seed=len(case))
    want = attend("torch_native", page_size, q, k, v, layer, fb)
    got = attend(backend, page_size, q, k, v, layer, fb)
    assert got.shape == want.shape == (sum(extend), HEADS * HEAD_DIM)
    err = float((got - want).abs().max())
    assert err < 2e-2, f"{backend} {case} page {page_size}: max error {err}"
