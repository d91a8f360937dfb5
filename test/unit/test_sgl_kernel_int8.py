"""sgl_kernel's weight-only int8 linear op against its torch reference, on every kernel path.

The reference (`sgl_kernel.quant.int8_linear_reference`) quantizes activations with the kernel's
exact steps, so the two must agree to float rounding; against the unquantized fp32 matmul only
the quantization error is allowed. Which path runs is fixed once per process (LMPROG_CPU_ISA
lowers it), so the AVX2 and scalar paths are checked in subprocesses with that variable set.

Needs the built package (`pip install --no-build-isolation -e sgl-kernel`); skipped without it.
Developers can point SGL_KERNEL_INT8_DEV_LIB at a JIT-built library holding the int8 ops instead.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

QUANT_PY = Path(__file__).resolve().parents[2] / "sgl-kernel" / "python" / "sgl_kernel" / "quant.py"
DEV_LIB_ENV = "SGL_KERNEL_INT8_DEV_LIB"

MS = (1, 2, 7, 16, 33)
KS = (64, 100, 576, 1536)
NS = (1, 17, 576, 1536)
DTYPES = (torch.float32, torch.bfloat16)


def load_quant() -> ModuleType:
    """sgl_kernel.quant from the installed package, or from the dev library; raises ImportError."""
    dev_lib = os.environ.get(DEV_LIB_ENV)
    if dev_lib:
        torch.ops.load_library(dev_lib)
        spec = importlib.util.spec_from_file_location("sgl_kernel_quant_dev", QUANT_PY)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        # lmprog's layers import `sgl_kernel.quant`: let them find this one.
        package = ModuleType("sgl_kernel")
        package.quant = module
        sys.modules.setdefault("sgl_kernel", package)
        sys.modules.setdefault("sgl_kernel.quant", module)
        return module
    import sgl_kernel  # noqa: F401  (loads the extension, which registers the ops)

    if not hasattr(torch.ops.sgl_kernel, "int8_linear"):
        raise ImportError("sgl_kernel was built without csrc/cpu/int8_linear.cpp; rebuild it")
    from sgl_kernel import quant

    return quant


@pytest.fixture(scope="module")
def quant() -> ModuleType:
    try:
        return load_quant()
    except (ImportError, OSError, RuntimeError) as e:
        pytest.skip(f"sgl_kernel's int8 ops are not available: {e}")


def make_case(
    quant: ModuleType, m: int, k: int, n: int, dtype: torch.dtype, bias: bool, seed: int = 0
) -> dict[str, torch.Tensor | None]:
    """Random fp32 weight (quantized and packed), x and bias. Activations get an offset and a
    few outliers, as real hidden states have, so zero points and clamping are exercised."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    qweight, scales = quant.quantize_int8_per_channel(w)
    case = {"w": w, "qweight": qweight, "scales": scales, "packed": quant.int8_pack(qweight)}
    return {**case, **make_inputs(m, k, n, dtype, bias, seed)}


def make_inputs(
    m: int, k: int, n: int, dtype: torch.dtype, bias: bool, seed: int = 0
) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g) + 0.3
    x[:, :: max(1, k // 7)] *= 8
    return {"x": x.to(dtype), "bias": torch.randn(n, generator=g) if bias else None}


def grid_failures(quant: ModuleType, k: int, n: int, dtypes: tuple[torch.dtype, ...]) -> list[str]:
    """Every M, with and without bias, for one weight shape; a description of each mismatch."""
    w = make_case(quant, 1, k, n, torch.float32, bias=False)
    failures = []
    for m, dtype, bias in itertools.product(MS, dtypes, (False, True)):
        c = {**w, **make_inputs(m, k, n, dtype, bias)}
        got = quant.int8_linear(c["x"], c["packed"], c["scales"], c["bias"])
        ref = quant.int8_linear_reference(c["x"], c["qweight"], c["scales"], c["bias"])
        problem = check_close(got, ref, dtype)
        if problem:
            failures.append(f"M={m} K={k} N={n} {dtype} bias={bias}: {problem}")
    return failures


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


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("k,n", list(itertools.product(KS, NS)))
def test_matches_reference(quant: ModuleType, k: int, n: int, dtype: torch.dtype) -> None:
    failures = grid_failures(quant, k, n, (dtype,))
    assert not failures, f"on {quant.int8_linear_path()}:\n" + "\n".join(failures)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("k,n", [(64, 17), (100, 576), (576, 576), (1536, 1536)])
def test_close_to_fp32_matmul(quant: ModuleType, k: int, n: int, dtype: torch.dtype) -> None:
    """The quantization error stays small next to the output: the layer still computes x W^T."""
    c = make_case(quant, 16, k, n, dtype, bias=True)
    got = quant.int8_linear(c["x"], c["packed"], c["scales"], c["bias"])
    exact = F.linear(c["x"].float(), c["w"], c["bias"])
    rel = ((got.float() - exact).norm() / exact.norm()).item()
    # Measured: 1.1-1.9%, mostly from the activations (each row's outliers widen its range);
    # the int8 weights alone give 0.6%.
    assert rel < 0.03, f"relative error {rel:.4f} vs the fp32 matmul"


def test_plain_weight_and_leading_dims(quant: ModuleType) -> None:
    """An unpacked [N, K] weight gives the packed result; x may have any leading dimensions."""
    c = make_case(quant, 6, 100, 40, torch.float32, bias=True)
    packed = quant.int8_linear(c["x"], c["packed"], c["scales"], c["bias"])
    plain = quant.int8_linear(c["x"], c["qweight"], c["scales"], c["bias"])
    torch.testing.assert_close(plain, packed, rtol=0, atol=0)
    batched = quant.int8_linear(c["x"].view(2, 3, 100), c["qweight"], c["scales"], c["bias"])
    torch.testing.assert_close(batched, packed.view(2, 3, 40), rtol=0, atol=0)
    empty = quant.int8_linear(c["x"][:0], c["qweight"], c["scales"])
    assert empty.shape == (0, 40)


def test_zero_rows_and_constant_rows(quant: ModuleType) -> None:
    """All-zero rows give exactly the bias; a zero weight row gives exactly its bias entry."""
    w = torch.randn(20, 64)
    w[3] = 0
    qweight, scales = quant.quantize_int8_per_channel(w)
    bias = torch.randn(20)
    x = torch.randn(3, 64)
    x[1] = 0
    y = quant.int8_linear(x, quant.int8_pack(qweight), scales, bias)
    assert torch.equal(y[1], bias)
    assert torch.equal(y[:, 3], bias[3].expand(3))


def test_pack_layout(quant: ModuleType) -> None:
    for n, k in [(1, 1), (17, 100), (48, 64), (33, 7)]:
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        assert torch.equal(quant.int8_pack(q), quant.int8_pack_reference(q)), (n, k)


def test_quantize_per_channel(quant: ModuleType) -> None:
    w = torch.randn(8, 50)
    w[5] = 0
    qweight, scales = quant.quantize_int8_per_channel(w)
    assert qweight.dtype == torch.int8 and scales.dtype == torch.float32
    assert qweight.abs().max() == 127 and scales[5] == 1
    err = (quant.dequantize_int8_per_channel(qweight, scales) - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-7).all()


def test_wrong_shapes_are_reported(quant: ModuleType) -> None:
    c = make_case(quant, 2, 64, 32, torch.float32, bias=False)
    packed = c["packed"]
    with pytest.raises(RuntimeError, match="int8_pack gives"):
        quant.int8_linear(torch.randn(2, 68), packed, c["scales"])
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        quant.int8_linear(c["x"].double(), packed, c["scales"])
    with pytest.raises(RuntimeError, match="bias must be"):
        quant.int8_linear(c["x"], packed, c["scales"], torch.zeros(31))


def test_fake_tensors_and_schema(quant: ModuleType) -> None:
    """The registered fakes agree with the kernels (what torch.compile relies on)."""
    c = make_case(quant, 3, 100, 40, torch.bfloat16, bias=True)
    packed = c["packed"]
    torch.library.opcheck(torch.ops.sgl_kernel.int8_pack.default, (c["qweight"],))
    torch.library.opcheck(
        torch.ops.sgl_kernel.int8_linear.default, (c["x"], packed, c["scales"], c["bias"])
    )


def test_int8_linear_module_replaces_linear_layers(quant: ModuleType) -> None:
    """lmprog's layers swapped for Int8Linear compute what the reference does, in both dtypes."""
    from lmprog.runtime.layers.linear import FastLinear
    from lmprog.runtime.layers.quantization import quantize_model
    from lmprog.runtime.layers.quantization.int8 import Int8Linear

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        FastLinear(100, 48), torch.nn.SiLU(), FastLinear(48, 17, bias=False)
    )
    floats = [(m.weight.detach().clone(), m.bias) for m in (model[0], model[2])]
    assert quantize_model(model, "int8") == ["0", "2"]
    assert isinstance(model[0], Int8Linear) and model[2].bias is None
    for dtype in DTYPES:
        x = torch.randn(5, 100).to(dtype)
        h = x
        for w, b in floats:
            qweight, scales = quant.quantize_int8_per_channel(w)
            h = quant.int8_linear_reference(h, qweight, scales, b)
            h = torch.nn.functional.silu(h) if w.shape[0] == 48 else h
        assert check_close(model(x), h, dtype) is None
    with pytest.raises(ValueError, match="supported: int8"):
        quantize_model(model, "int4")


def run_forced(isa: str) -> dict:
    env = {**os.environ, "LMPROG_CPU_ISA": isa}
    proc = subprocess.run(
        [sys.executable, __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, f"LMPROG_CPU_ISA={isa} run failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("isa,path", [("avx2", "avx2"), ("scalar", "scalar")])
def test_forced_lower_path(quant: ModuleType, isa: str, path: str) -> None:
    """LMPROG_CPU_ISA=avx2 / scalar select those kernels, and they match the reference too."""
    if path == "avx2" and quant.int8_linear_path() == "scalar":
        pytest.skip("this CPU has no AVX2")
    report = run_forced(isa)
    assert report["path"] == path
    assert not report["failures"], "\n".join(report["failures"][:20])


if __name__ == "__main__":
    # The subprocess side of test_forced_lower_path: one JSON line with the path and mismatches.
    module = load_quant()
    failures = [
        f for k, n in itertools.product(KS, NS) for f in grid_failures(module, k, n, DTYPES)
    ]
    print(json.dumps({"path": module.int8_linear_path(), "failures": failures}))
