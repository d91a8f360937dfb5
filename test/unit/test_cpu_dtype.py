"""dtype="auto" on a CPU: bfloat16 where the CPU computes it natively, float32 elsewhere."""

from __future__ import annotations

import pytest
import torch

from lmprog.runtime.cpu_dtype import auto_cpu_dtype, cpu_flags
from lmprog.runtime.server_args import ServerArgs


@pytest.mark.parametrize(
    ("flags", "isa_env", "want"),
    [
        ({"avx2", "fma"}, "", torch.float32),  # AVX2 only
        ({"avx512f", "avx512_vnni"}, "", torch.float32),  # Cascade Lake: bf16 emulated
        ({"avx512f", "avx512_bf16"}, "", torch.bfloat16),  # Cooper Lake, Zen 4
        ({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "", torch.bfloat16),  # SPR on
        ({"avx512f", "avx512_bf16", "amx_bf16"}, "avx2", torch.float32),  # lowered for a test
        ({"avx512f", "avx512_bf16", "amx_bf16"}, "torch", torch.float32),
        ({"avx512f", "avx512_bf16", "amx_bf16"}, "avx512", torch.bfloat16),
    ],
)
def test_auto_picks_bf16_only_with_native_bf16(flags, isa_env, want) -> None:
    assert auto_cpu_dtype(flags, isa_env) is want


def test_this_machine_follows_the_rule(monkeypatch) -> None:
    monkeypatch.delenv("LMPROG_CPU_ISA", raising=False)
    native = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    args = ServerArgs(device="cpu")  # dtype defaults to auto
    assert args.torch_dtype is (torch.bfloat16 if native else torch.float32)
    assert ServerArgs(device="cpu", dtype="float32").torch_dtype is torch.float32
