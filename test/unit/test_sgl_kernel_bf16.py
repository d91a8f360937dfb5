"""sgl_kernel's packed bf16 linear op against its torch reference, on every kernel path, and the
engine's use of it (bf16 models on CPU pack their linear layers).

Products of bf16 values are exact in float32, so the kernel and the reference
(`sgl_kernel.bf16.bf16_linear_reference`) differ only in the order of float32 sums: with float32
output they agree to ~1e-5 relative. The path is fixed per process, so the AVX-512 path without
BF16's dot product (LMPROG_BF16_DOT=0) and the scalar one (LMPROG_CPU_ISA=avx2: no AVX2 path)
run in subprocesses.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

sgl_kernel = pytest.importorskip("sgl_kernel")
if not hasattr(torch.ops.sgl_kernel, "bf16_linear"):
    pytest.skip("sgl_kernel was built without bf16_linear", allow_module_level=True)

from sgl_kernel.bf16 import (
    bf16_linear,
    bf16_linear_path,
    bf16_linear_reference,
    bf16_pack,
    bf16_pack_reference,
)

SHAPES = [(m, n, k) for m, n, k in itertools.product((1, 3, 4, 9), (1, 17, 64, 200), (7, 64, 577))]


def mismatches() -> list[str]:
    """Every shape with and without bias, float32 and bf16 activations; what disagrees."""
    bad = []
    gen = torch.Generator().manual_seed(0)
    for m, n, k in SHAPES:
        w = torch.randn(n, k, generator=gen).bfloat16()
        bias = torch.randn(n, generator=gen)
        packed = bf16_pack(w)
        for dtype, b in itertools.product((torch.float32, torch.bfloat16), (None, bias)):
            x = torch.randn(2, m, k, generator=gen).to(dtype)  # leading dims kept
            got = bf16_linear(x, packed, n, b)
            want = bf16_linear_reference(x, w, b)
            assert got.shape == (2, m, n) and got.dtype == dtype
            scale = want.float().abs().max().item() + 1e-6
            tol = 2e-5 if dtype == torch.float32 else 8e-3  # bf16: one output rounding
            if (got.float() - want.float()).abs().max().item() > tol * scale:
                bad.append(f"m={m} n={n} k={k} {dtype} bias={b is not None}")
    return bad


def test_pack_layout() -> None:
    w = torch.randn(37, 9).bfloat16()
    assert torch.equal(bf16_pack(w), bf16_pack_reference(w))


def test_matches_reference_on_this_path() -> None:
    assert bf16_linear_path() in ("avx512_bf16", "avx512", "scalar")
    assert mismatches() == []


@pytest.mark.parametrize(
    ("env", "path"),
    [({"LMPROG_BF16_DOT": "0"}, "avx512"), ({"LMPROG_CPU_ISA": "avx2"}, "scalar")],
)
def test_forced_lower_paths(env: dict[str, str], path: str) -> None:
    if path == "avx512" and sgl_kernel.detected_isa() not in ("avx512", "amx"):
        pytest.skip("this CPU has no AVX-512")
    code = (
        "import json, test_sgl_kernel_bf16 as t; "
        "print(json.dumps([t.bf16_linear_path(), t.mismatches()]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env={**os.environ, **env},
        cwd=os.path.dirname(__file__),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got_path, bad = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (got_path, bad) == (path, [])


def test_wrong_shapes_are_reported() -> None:
    packed = bf16_pack(torch.randn(20, 8).bfloat16())
    with pytest.raises(RuntimeError, match=r"for N = 20, K = 10 bf16_pack gives"):
        bf16_linear(torch.randn(1, 10), packed, 20)
    with pytest.raises(RuntimeError, match=r"bias must be \[20\]"):
        bf16_linear(torch.randn(1, 8), packed, 20, torch.zeros(3))
    with pytest.raises(RuntimeError, match="bfloat16 \\[N, K\\]"):
        bf16_pack(torch.randn(4, 4))


def test_fake_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.empty(20, 9, dtype=torch.bfloat16)
        packed = bf16_pack(w)
        assert packed.shape == (2, 5, 32)
        assert bf16_linear(torch.empty(3, 9), packed, 20).shape == (3, 20)


def test_bf16_models_pack_their_linear_layers() -> None:
    """A bf16 tiny Llama: every linear layer (the tied LM head too) packed where the kernel has a
    vector path, with logits close to the unpacked model's."""
    transformers = pytest.importorskip("transformers")
    from lmprog.runtime.layers.linear_bf16 import (
        PackedBf16Linear,
        bf16_kernel_path,
        pack_bf16_linears,
    )
    from lmprog.runtime.models.llama import LlamaForCausalLM

    if bf16_kernel_path() is None:
        pytest.skip("no vector path for bf16_linear on this CPU")
    config = transformers.LlamaConfig(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        attention_bias=True,
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    model = LlamaForCausalLM(config, torch.bfloat16)
    model.load_weights(hf.state_dict().items())
    hidden = torch.randn(5, 64).bfloat16()
    before = [model.lm_head(hidden), model.model.layers[0].self_attn.qkv_proj(hidden)]
    names = pack_bf16_linears(model)
    assert len(names) == 9 and "lm_head" in names
    assert isinstance(model.lm_head, PackedBf16Linear)
    after = [model.lm_head(hidden), model.model.layers[0].self_attn.qkv_proj(hidden)]
    for a, b in zip(before, after):
        assert (a.float() - b.float()).abs().max() <= 2e-2 * a.float().abs().max()
