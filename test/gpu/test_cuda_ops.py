"""sgl_kernel_cuda's ops against lmprog's torch path on random inputs (bf16, fp16, fp32), inside a
CUDA graph, and a tiny Llama that runs through them. Skipped without CUDA; on a GPU machine the
ops must be built first (sgl-kernel/setup.py, SGL_KERNEL_BUILD=cuda) or JIT-built on import
(SGL_KERNEL_CUDA_JIT=1).

The references are the layers' own torch code (`RMSNorm._norm`, SiluAndMul's silu-then-mul,
`RotaryEmbedding.apply` plus an indexed store): the kernels round as they do, so the only
differences allowed are the sum of squares adding up in another order (one step of the dtype).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
sgl_kernel_cuda = pytest.importorskip("sgl_kernel_cuda", reason="sgl_kernel_cuda is not built")

from lmprog.runtime.layers import kernels
from lmprog.runtime.layers.activation import SiluAndMul
from lmprog.runtime.layers.layernorm import RMSNorm
from lmprog.runtime.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# RMSNorm: one step of the dtype on the normalized value, and one on the product.
NORM_TOL = {
    torch.bfloat16: {"atol": 1e-2, "rtol": 2e-2},
    torch.float16: {"atol": 1e-3, "rtol": 4e-3},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
}


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=CUDA).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=CUDA) * scale).to(dtype)


def misaligned(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of x that starts one element past a 16-byte boundary (the scalar path)."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    out = buf[1:].view(x.shape)
    out.copy_(x)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


def norm_layer(hidden: int, dtype: torch.dtype, eps: float) -> RMSNorm:
    norm = RMSNorm(hidden, eps, dtype).to(CUDA)
    norm.weight.copy_(randn(hidden, dtype=dtype, seed=1))
    return norm


# ---- the ops against the torch path ----------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (7, 4096), (300, 4096), (5, 576), (3, 100)])
def test_rmsnorm_matches_the_layer(dtype: torch.dtype, rows: int, hidden: int) -> None:
    norm = norm_layer(hidden, dtype, 1e-5)
    x = randn(rows, hidden, dtype=dtype, scale=3.0)
    torch.testing.assert_close(
        sgl_kernel_cuda.rmsnorm(x, norm.weight, 1e-5), norm._norm(x), **NORM_TOL[dtype]
    )
    torch.testing.assert_close(
        sgl_kernel_cuda.rmsnorm(misaligned(x), norm.weight, 1e-5), norm._norm(x), **NORM_TOL[dtype]
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (300, 4096), (5, 576), (3, 100)])
def test_fused_add_rmsnorm_matches_the_layer_in_place(
    dtype: torch.dtype, rows: int, hidden: int
) -> None:
    norm = norm_layer(hidden, dtype, 1e-6)
    x, residual = randn(rows, hidden, dtype=dtype, seed=2), randn(rows, hidden, dtype=dtype, seed=3)
    summed = residual + x  # rounded to the dtype, as the layer's residual.add_(x)
    for make in (torch.clone, misaligned):
        xk, rk = make(x), make(residual)
        assert sgl_kernel_cuda.fused_add_rmsnorm(xk, rk, norm.weight, 1e-6) is None
        torch.testing.assert_close(rk, summed, atol=0, rtol=0)
        torch.testing.assert_close(xk, norm._norm(summed), **NORM_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 14336), (37, 2 * 14336), (300, 2 * 1536), (2, 3, 200)])
def test_silu_and_mul_matches_the_layer(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = randn(*shape, dtype=dtype, scale=4.0, seed=4)
    d = shape[-1] // 2
    ref = F.silu(x[..., :d]).mul_(x[..., d:])  # SiluAndMul's torch path
    torch.testing.assert_close(sgl_kernel_cuda.silu_and_mul(x), ref)
    torch.testing.assert_close(sgl_kernel_cuda.silu_and_mul(misaligned(x)), ref)


ROPE_CASES = [
    # (tokens, heads, kv_heads, head_dim)
    (1, 32, 8, 128),  # a Llama-3-8B decode step
    (37, 32, 8, 128),
    (300, 32, 8, 128),
    (5, 4, 4, 64),
    (9, 8, 1, 72),  # half a head (36) is no whole number of 8-wide packs: bf16/fp16 go scalar
]


def rope_inputs(t: int, h: int, hkv: int, d: int, dtype: torch.dtype, seed: int):
    rope = RotaryEmbedding(d, 4096, {"rope_type": "default", "rope_theta": 500000.0}).to(CUDA)
    g = torch.Generator(device=CUDA).manual_seed(seed)
    positions = torch.randint(0, 4096, (t,), generator=g, device=CUDA)
    rows = rope.rows(positions, dtype)
    qkv = randn(t, (h + 2 * hkv) * d, dtype=dtype, seed=seed)
    slots = 2 * t + 10
    k_buf = torch.zeros(slots, hkv, d, dtype=dtype, device=CUDA)
    v_buf = torch.zeros(slots, hkv, d, dtype=dtype, device=CUDA)
    loc = torch.randperm(slots, generator=g, device=CUDA)[:t]
    return rows, qkv, k_buf, v_buf, loc


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h,hkv,d", ROPE_CASES)
def test_rope_kv_store_matches_rotary_and_the_pool_write(
    dtype: torch.dtype, t: int, h: int, hkv: int, d: int
) -> None:
    rows, qkv, k_buf, v_buf, loc = rope_inputs(t, h, hkv, d, dtype, seed=5)
    heads = qkv.view(t, h + 2 * hkv, d)
    q_ref = RotaryEmbedding.apply(heads[:, :h], rows.cos, rows.sin)
    k_ref = RotaryEmbedding.apply(heads[:, h : h + hkv], rows.cos, rows.sin)
    untouched = torch.ones(k_buf.shape[0], dtype=torch.bool, device=CUDA)
    untouched[loc] = False
    for qkv_in in (qkv, misaligned(qkv)):  # the packed path (where it applies), the scalar one
        k_buf.zero_()
        v_buf.zero_()
        q, k = sgl_kernel_cuda.rope_kv_store(
            qkv_in, rows.cos32, rows.sin32, loc, k_buf, v_buf, h, hkv
        )
        torch.testing.assert_close(q, q_ref)
        torch.testing.assert_close(k, k_ref)
        torch.testing.assert_close(k_buf[loc], k, atol=0, rtol=0)
        torch.testing.assert_close(v_buf[loc], heads[:, h + hkv :], atol=0, rtol=0)
        assert not k_buf[untouched].any() and not v_buf[untouched].any()


def test_rope_kv_store_traps_on_a_slot_outside_the_pool() -> None:
    """In a subprocess: the trap leaves that process's CUDA context unusable."""
    script = (
        "import torch, sgl_kernel_cuda\n"
        "qkv = torch.randn(2, 3 * 64, device='cuda')\n"
        "cs = torch.ones(2, 32, device='cuda')\n"
        "buf = torch.zeros(4, 1, 64, device='cuda')\n"
        "loc = torch.tensor([0, 4], device='cuda')\n"
        "try:\n"
        "    sgl_kernel_cuda.rope_kv_store(qkv, cs, cs, loc, buf, buf.clone(), 1, 1)\n"
        "    torch.cuda.synchronize()\n"
        "except RuntimeError as e:\n"
        "    print('raised:', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert "raised:" in run.stdout, run.stdout + run.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_argument_errors_name_the_problem(dtype: torch.dtype) -> None:
    x = randn(4, 64, dtype=dtype)
    with pytest.raises(RuntimeError, match="share a dtype"):
        sgl_kernel_cuda.rmsnorm(x, torch.ones(64, device=CUDA), 1e-6)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        sgl_kernel_cuda.rmsnorm(x, torch.ones(64, dtype=dtype), 1e-6)
    with pytest.raises(RuntimeError, match="contiguous"):
        sgl_kernel_cuda.silu_and_mul(randn(64, 4, dtype=dtype).t())
    rows, qkv, k_buf, v_buf, loc = rope_inputs(3, 4, 2, 64, dtype, seed=6)
    with pytest.raises(RuntimeError, match="qkv width"):
        sgl_kernel_cuda.rope_kv_store(qkv, rows.cos32, rows.sin32, loc, k_buf, v_buf, 4, 1)


# ---- CUDA graphs -------------------------------------------------------------------------------
def test_ops_replay_in_a_cuda_graph() -> None:
    """Captured once and replayed on new inputs: the ops launch on the capture stream and keep
    nothing on the host that goes stale."""
    dtype, t, h, hkv, d, hidden = torch.bfloat16, 8, 8, 2, 128, 1024
    norm = norm_layer(hidden, dtype, 1e-6)
    x, residual = randn(t, hidden, dtype=dtype, seed=7), randn(t, hidden, dtype=dtype, seed=8)
    gate_up = randn(t, 2 * hidden, dtype=dtype, seed=9)
    rows, qkv, k_buf, v_buf, loc = rope_inputs(t, h, hkv, d, dtype, seed=10)
    cos, sin = rows.cos32.clone(), rows.sin32.clone()

    def step() -> tuple[torch.Tensor, ...]:
        sgl_kernel_cuda.fused_add_rmsnorm(x, residual, norm.weight, 1e-6)
        q, k = sgl_kernel_cuda.rope_kv_store(qkv, cos, sin, loc, k_buf, v_buf, h, hkv)
        return (
            sgl_kernel_cuda.rmsnorm(x, norm.weight, 1e-6),
            sgl_kernel_cuda.silu_and_mul(gate_up),
            q,
            k,
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm up outside the capture, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()

    new = [
        randn(*a.shape, dtype=a.dtype, seed=20 + i)
        for i, a in enumerate((x, residual, gate_up, qkv))
    ]
    rows2, *_ = rope_inputs(t, h, hkv, d, dtype, seed=11)
    for dst, src in zip((x, residual, gate_up, qkv, cos, sin), (*new, rows2.cos32, rows2.sin32)):
        dst.copy_(src)
    k_buf.zero_()
    v_buf.zero_()
    expected_x, expected_r = x.clone(), residual.clone()
    sgl_kernel_cuda.fused_add_rmsnorm(expected_x, expected_r, norm.weight, 1e-6)
    expected = (
        sgl_kernel_cuda.rmsnorm(expected_x, norm.weight, 1e-6),
        sgl_kernel_cuda.silu_and_mul(gate_up),
        *sgl_kernel_cuda.rope_kv_store(qkv, cos, sin, loc, k_buf.clone(), v_buf.clone(), h, hkv),
    )
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(x, expected_x, atol=0, rtol=0)
    torch.testing.assert_close(residual, expected_r, atol=0, rtol=0)
    torch.testing.assert_close(k_buf[loc], outs[3], atol=0, rtol=0)


# ---- lmprog's layers through the ops ------------------------------------------------------------
class OpLog(TorchDispatchMode):
    """Records the name of every op that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def cuda_ops_off(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(kernels.CUDA_OPS_ENV, "0")
    kernels.cuda_kernels.cache_clear()
    yield
    kernels.cuda_kernels.cache_clear()


def test_kernels_for_picks_the_cuda_ops_for_contiguous_float_cuda_tensors() -> None:
    for dtype in DTYPES:
        assert kernels.kernels_for(torch.empty(2, 8, dtype=dtype, device=CUDA)) is sgl_kernel_cuda
    assert kernels.kernels_for(torch.empty(8, 2, device=CUDA).t()) is None
    assert kernels.kernels_for(torch.empty(2, 8, dtype=torch.int64, device=CUDA)) is None
    cpu = torch.empty(2, 8)
    assert kernels.kernels_for(cpu) is kernels.cpu_kernels()  # CPU tensors: as before


def test_lmprog_cuda_ops_0_turns_them_off(cuda_ops_off) -> None:
    x = torch.empty(2, 8, dtype=torch.bfloat16, device=CUDA)
    assert kernels.kernels_for(x) is None
    log = OpLog()
    with log:
        SiluAndMul()(x)
    assert not any(name.startswith("sgl_kernel_cuda") for name in log.names), log.names


def tiny_llama_run(seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor], set[str]]:
    """A 2-layer random bf16 Llama on CUDA: a 20-token prefill, then 4 decode steps. Returns the
    logits of every token, the K buffers of the slots used, and the ops that ran."""
    transformers = pytest.importorskip("transformers")
    from lmprog.runtime.layers.attention import create_attention_backend
    from lmprog.runtime.mem_cache.allocator import TokenToKVPoolAllocator
    from lmprog.runtime.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPool
    from lmprog.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode
    from lmprog.runtime.models.llama import LlamaForCausalLM

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    with torch.device(CUDA):
        model = LlamaForCausalLM(config, torch.bfloat16)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.uniform_(0.5, 1.5)
        else:
            p.normal_(0.0, 0.1)
    req_pool = ReqToTokenPool(2, 512, CUDA)
    kv_pool = TokenToKVPool(
        1024, 1, model.num_layers, model.num_kv_heads, model.head_dim, torch.bfloat16, CUDA
    )
    allocator = TokenToKVPoolAllocator(1024, 1, CUDA)
    backend = create_attention_backend("torch_native")
    req = req_pool.alloc()
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(seed)).tolist()
    log, rows, used = OpLog(), [], []

    def step(mode: ForwardMode, toks: list[int], prefix: int) -> torch.Tensor:
        loc = allocator.alloc(len(toks))
        req_pool.write(req, prefix, loc)
        used.append(loc)
        fb = ForwardBatch.build(
            mode, toks, [req], [prefix], [len(toks)], loc, CUDA,
            req_to_token_pool=req_pool, token_to_kv_pool=kv_pool, attn_backend=backend,
            logits_indices=torch.arange(len(toks), device=CUDA),
        )  # fmt: skip
        backend.init_forward_metadata(fb)
        with torch.inference_mode(), log:
            return model(fb)

    rows.append(step(ForwardMode.EXTEND, ids[:20], 0))
    rows += [step(ForwardMode.DECODE, [ids[i]], i) for i in range(20, 24)]
    slots = torch.cat(used)
    return torch.cat(rows), [buf[slots] for buf in kv_pool.k_buffer], log.names


def test_a_tiny_llama_runs_through_the_ops_and_matches_the_torch_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logits, k_cache, ops = tiny_llama_run()
    wanted = {f"sgl_kernel_cuda.{op}" for op in sgl_kernel_cuda.__all__ if op != "source"}
    assert wanted <= ops, f"not run: {wanted - ops}"
    monkeypatch.setenv(kernels.CUDA_OPS_ENV, "0")
    kernels.cuda_kernels.cache_clear()
    try:
        ref_logits, ref_k_cache, ref_ops = tiny_llama_run()
    finally:
        kernels.cuda_kernels.cache_clear()
    assert not any(op.startswith("sgl_kernel_cuda") for op in ref_ops)
    # The same roundings, the sums of squares in another order: bf16 steps here and there.
    torch.testing.assert_close(logits, ref_logits, atol=3e-2, rtol=3e-2)
    for got, want in zip(k_cache, ref_k_cache):
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
