"""sgl_kernel's GGUF linear op (Q4_0, Q4_1, Q8_0 blocks) against its torch reference, per path.

`dequantize_blocks` is checked against the `gguf` package's own dequantizer, on blocks that
package quantized. The reference (`sgl_kernel.gguf.gguf_linear_reference`) quantizes activations
with the kernel's exact steps, so the two must agree to float rounding; against the fp32 matmul
of the dequantized weights only the activations' quantization error is allowed. Which path runs
is fixed once per process (LMPROG_CPU_ISA lowers it), so the AVX2 and scalar paths are checked in
subprocesses with that variable set.

Needs the built package (`pip install --no-build-isolation -e sgl-kernel`); skipped without it.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

gguf_py = pytest.importorskip("gguf", reason="the gguf package makes the test weights")

QTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}
MS = (1, 3, 7, 16, 64)
KS = (32, 576, 1536)
NS = (40, 64)
DTYPES = (torch.float32, torch.bfloat16)


def load_gguf() -> ModuleType:
    """sgl_kernel.gguf from the installed package; raises ImportError without the ops."""
    import sgl_kernel  # noqa: F401  (loads the extension, which registers the ops)

    if not hasattr(torch.ops.sgl_kernel, "gguf_linear"):
        raise ImportError("sgl_kernel was built without csrc/cpu/gguf_linear.cpp; rebuild it")
    from sgl_kernel import gguf

    return gguf


@pytest.fixture(scope="module")
def gguf() -> ModuleType:
    try:
        return load_gguf()
    except (ImportError, OSError, RuntimeError) as e:
        pytest.skip(f"sgl_kernel's GGUF ops are not available: {e}")


def quantize(w: torch.Tensor, qtype: int) -> torch.Tensor:
    """float [N, K] -> uint8 [N, row_bytes] blocks, as a GGUF file stores them."""
    return torch.from_numpy(gguf_py.quants.quantize(w.numpy(), gguf_py.GGMLQuantizationType(qtype)))


def make_weight(n: int, k: int, qtype: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(n, k, generator=g) / k**0.5, qtype)


def make_inputs(
    m: int, k: int, n: int, dtype: torch.dtype, bias: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x with an offset and a few outliers, as real hidden states have, so blocks differ in scale."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g) + 0.3
    x[:, :: max(1, k // 7)] *= 8
    return x.to(dtype), torch.randn(n, generator=g) if bias else None


def check_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> str | None:
    """None when got matches the reference to float rounding (one bf16 ulp for bfloat16)."""
    if got.dtype != ref.dtype or got.shape != ref.shape:
        return f"got {got.dtype} {tuple(got.shape)}, expected {ref.dtype} {tuple(ref.shape)}"
    scale = ref.float().abs().max().item() or 1.0
    rtol = 1e-5 if dtype == torch.float32 else 2**-7
    err = (got.float() - ref.float()).abs()
    bad = err > rtol * ref.float().abs() + 1e-5 * scale
    if bad.any():
        return (
            f"{int(bad.sum())} elements off, max error {err.max().item():.3g} (scale {scale:.3g})"
        )
    return None


def grid_failures(gguf: ModuleType, qtype: int, k: int, n: int) -> list[str]:
    """Every M, dtype, with and without bias, for one weight; a description of each mismatch."""
    raw = make_weight(n, k, qtype)
    packed = gguf.gguf_pack(raw, qtype)
    failures = []
    for m, dtype, bias in itertools.product(MS, DTYPES, (False, True)):
        x, b = make_inputs(m, k, n, dtype, bias)
        got = gguf.gguf_linear(x, packed, qtype, n, k, b)
        ref = gguf.gguf_linear_reference(x, raw, qtype, k, b)
        problem = check_close(got, ref, dtype)
        if problem:
            failures.append(f"qtype={qtype} M={m} K={k} N={n} {dtype} bias={bias}: {problem}")
    return failures


def all_failures(gguf: ModuleType) -> list[str]:
    grid = itertools.product(QTYPES.values(), KS, NS)
    return [f for qtype, k, n in grid for f in grid_failures(gguf, qtype, k, n)]


@pytest.mark.parametrize("qtype", QTYPES.values(), ids=QTYPES.keys())
def test_dequantize_matches_gguf_package(gguf: ModuleType, qtype: int) -> None:
    w = torch.randn(24, 96)
    w[3] = 0  # an all-zero row: d = 0
    raw = quantize(w, qtype)
    expected = gguf_py.quants.dequantize(raw.numpy(), gguf_py.GGMLQuantizationType(qtype))
    assert torch.equal(gguf.dequantize_blocks(raw, qtype, 96), torch.from_numpy(expected))
    # A gathered subset of rows (what an embedding lookup dequantizes).
    idx = torch.tensor([5, 0, 5, 23])
    assert torch.equal(gguf.dequantize_blocks(raw[idx], qtype, 96), torch.from_numpy(expected)[idx])


@pytest.mark.parametrize("qtype", QTYPES.values(), ids=QTYPES.keys())
def test_pack_layout(gguf: ModuleType, qtype: int) -> None:
    for n, k in [(1, 32), (16, 64), (40, 576), (33, 96)]:
        raw = make_weight(n, k, qtype)
        packed = gguf.gguf_pack(raw, qtype)
        assert packed.shape == gguf.packed_shape(n, k, qtype)
        assert torch.equal(packed, gguf.gguf_pack_reference(raw, qtype)), (n, k)


def test_matches_reference(gguf: ModuleType) -> None:
    """Each qtype, M, N (40 is not a multiple of 16), K, dtype, with and without bias."""
    failures = all_failures(gguf)
    assert not failures, f"on {gguf.gguf_linear_path()}:\n" + "\n".join(failures[:20])


@pytest.mark.parametrize("qtype", QTYPES.values(), ids=QTYPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_close_to_float_matmul(gguf: ModuleType, qtype: int, dtype: torch.dtype) -> None:
    """Next to the float matmul of the dequantized weight, only the activations' error is left."""
    k, n = 576, 40
    raw = make_weight(n, k, qtype)
    x, b = make_inputs(16, k, n, dtype, bias=True)
    got = gguf.gguf_linear(x, raw, qtype, n, k, b)
    exact = F.linear(x.float(), gguf.dequantize_blocks(raw, qtype, k), b)
    rel = ((got.float() - exact).norm() / exact.norm()).item()
    # Measured: 0.5-0.6% (int8 activations per 32-block), bf16 output rounding adds ~0.2%.
    assert rel < 0.015, f"relative error {rel:.4f} vs the fp32 matmul"


def test_raw_weight_and_leading_dims(gguf: ModuleType) -> None:
    """A raw weight gives the packed result; x may have any leading dimensions."""
    qtype, k, n = QTYPES["Q4_1"], 64, 40
    raw = make_weight(n, k, qtype)
    x, b = make_inputs(6, k, n, torch.float32, bias=True)
    packed = gguf.gguf_linear(x, gguf.gguf_pack(raw, qtype), qtype, n, k, b)
    torch.testing.assert_close(gguf.gguf_linear(x, raw, qtype, n, k, b), packed, rtol=0, atol=0)
    batched = gguf.gguf_linear(x.view(2, 3, k), raw, qtype, n, k, b)
    torch.testing.assert_close(batched, packed.view(2, 3, n), rtol=0, atol=0)
    assert gguf.gguf_linear(x[:0], raw, qtype, n, k).shape == (0, n)


@pytest.mark.parametrize("qtype", QTYPES.values(), ids=QTYPES.keys())
def test_zero_blocks(gguf: ModuleType, qtype: int) -> None:
    """All-zero rows of x give exactly the bias; an all-zero weight row exactly its bias entry."""
    w = torch.randn(20, 64)
    w[3] = 0
    raw = quantize(w, qtype)
    bias = torch.randn(20)
    x = torch.randn(3, 64)
    x[1] = 0
    y = gguf.gguf_linear(x, raw, qtype, 20, 64, bias)
    assert torch.equal(y[1], bias)
    assert torch.equal(y[:, 3], bias[3].expand(3))


def test_wrong_sizes_are_reported(gguf: ModuleType) -> None:
    qtype, k, n = QTYPES["Q8_0"], 64, 32
    raw = make_weight(n, k, qtype)
    packed = gguf.gguf_pack(raw, qtype)
    x = torch.randn(2, k)
    with pytest.raises(RuntimeError, match="x has 68 features; the weight has K = 64"):
        gguf.gguf_linear(torch.randn(2, 68), packed, qtype, n, k)
    with pytest.raises(RuntimeError, match="K = 48 is not a positive multiple of 32"):
        gguf.gguf_linear(torch.randn(2, 48), packed, qtype, n, 48)
    with pytest.raises(RuntimeError, match=r"gguf_pack gives uint8 \[3, 17, 64\]"):
        gguf.gguf_linear(x, packed, qtype, 48, k)
    with pytest.raises(RuntimeError, match=r"expected \[32, 68\]"):
        gguf.gguf_linear(x, raw[:, :51], qtype, n, k)
    with pytest.raises(RuntimeError, match="GGUF type 12 is not supported"):
        gguf.gguf_linear(x, packed, 12, n, k)
    with pytest.raises(RuntimeError, match="whole blocks of 34 bytes"):
        gguf.gguf_pack(raw[:, :40], qtype)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        gguf.gguf_linear(x.double(), packed, qtype, n, k)
    with pytest.raises(RuntimeError, match="bias must be"):
        gguf.gguf_linear(x, packed, qtype, n, k, torch.zeros(31))


def test_fake_tensors_and_compile(gguf: ModuleType) -> None:
    """The registered fakes agree with the kernels, and torch.compile traces through the op."""
    qtype, k, n = QTYPES["Q4_0"], 96, 40
    raw = make_weight(n, k, qtype)
    packed = gguf.gguf_pack(raw, qtype)
    x, b = make_inputs(3, k, n, torch.bfloat16, bias=True)
    torch.library.opcheck(torch.ops.sgl_kernel.gguf_pack.default, (raw, qtype))
    torch.library.opcheck(torch.ops.sgl_kernel.gguf_linear.default, (x, packed, qtype, n, k, b))

    def layer(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(gguf.gguf_linear(x, packed, qtype, n, k, b))

    # aot_eager traces through the fakes as inductor does, without inductor's code generation
    # (30 s on 2 cores; the op there gives the same result too).
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


def run_forced(isa: str) -> dict:
    env = {**os.environ, "LMPROG_CPU_ISA": isa}
    proc = subprocess.run(
        [sys.executable, __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"LMPROG_CPU_ISA={isa} run failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("isa,path", [("avx2", "avx2"), ("scalar", "scalar")])
def test_forced_lower_path(gguf: ModuleType, isa: str, path: str) -> None:
    """LMPROG_CPU_ISA=avx2 / scalar select those kernels, and they match the reference too."""
    if path == "avx2" and gguf.gguf_linear_path() == "scalar":
        pytest.skip("this CPU has no AVX2")
    report = run_forced(isa)
    assert report["path"] == path
    assert not report["failures"], "\n".join(report["failures"][:20])


if __name__ == "__main__":
    # The subprocess side of test_forced_lower_path: one JSON line with the path and mismatches.
    module = load_gguf()
    print(json.dumps({"path": module.gguf_linear_path(), "failures": all_failures(module)}))
