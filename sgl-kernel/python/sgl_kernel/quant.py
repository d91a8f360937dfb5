"""Weight-only int8 linear layers (csrc/cpu/int8_linear.cpp) and their torch reference.

Weights are int8 per output channel, symmetric: `w[n, k] ~ qweight[n, k] * scales[n]`. The kernel
quantizes each row of x on the fly to uint8 with a scale and a zero point and computes integer
dot products (AVX512-VNNI, or AVX2, or scalar: the same integer math on every path), so
`int8_linear_reference` below, which does the same steps in torch, matches it to float rounding.
Against the unquantized `F.linear(x, w)` the difference is the quantization error of both sides.

Typical use: quantize and pack once at load, then call with the packed weight.

    qweight, scales = quantize_int8_per_channel(w)   # [N, K] int8, [N] float32
    packed = int8_pack(qweight)                      # the kernel's layout, see int8_linear.cpp
    y = int8_linear(x, packed, scales, bias)         # x [..., K] float32 or bfloat16
"""

from __future__ import annotations

import torch

# Rows of x are quantized to uint8 over [min(x, 0), max(x, 0)].
_LEVELS = 255


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float weight -> (int8 qweight [N, K], float32 scales [N]); round to nearest.

    scale = max|w[n]| / 127, so each row uses the full symmetric range [-127, 127] (-128 is left
    out: a symmetric grid has no bias towards negative values). An all-zero row gets scale 1.
    """
    assert w.dim() == 2, f"expected a [N, K] weight, got shape {tuple(w.shape)}"
    w = w.float()
    scales = w.abs().amax(dim=1) / 127
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    qweight = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return qweight, scales


def int8_pack(qweight: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> the kernel's blocked layout, int8 [ceil(N/16), ceil(K/4) + 1, 64]."""
    return torch.ops.sgl_kernel.int8_pack(qweight)


def int8_pack_reference(qweight: torch.Tensor) -> torch.Tensor:
    """What `int8_pack` returns, in torch (the layout is pictured in csrc/cpu/int8_linear.cpp).

    Block b holds rows 16b..16b+15; its line g < KG holds their columns 4g..4g+3, row by row
    (16 rows x 4 bytes: one vpdpbusd operand); line KG holds the rows' sums as int32.
    """
    n, k = qweight.shape
    nb, kg = (n + 15) // 16, (k + 3) // 4
    q = torch.zeros(nb * 16, kg * 4, dtype=torch.int8)
    q[:n, :k] = qweight
    lines = q.view(nb, 16, kg, 4).permute(0, 2, 1, 3).reshape(nb, kg, 64)
    sums = q.view(nb, 16, kg * 4).sum(dim=2, dtype=torch.int32)  # [nb, 16]
    return torch.cat([lines, sums.view(torch.int8).view(nb, 1, 64)], dim=1)


def int8_linear_path() -> str:
    """The kernel int8_linear runs in this process: avx512_vnni, avx2 or scalar."""
    return torch.ops.sgl_kernel.int8_linear_path()


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ (qweight * scales[:, None]).T + bias -> [..., N] in x's dtype.

    `qweight` is packed (from `int8_pack`) or a plain [N, K] int8 tensor, which is then packed on
    every call (fine for tests; layers pack once). `bias` may be float32 or x's dtype.
    """
    return torch.ops.sgl_kernel.int8_linear(x, qweight, scales, bias)


def quantize_activations_reference(
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[M, K] -> (xq [M, K] uint8 values as float, scale [M], zero point [M] as float).

    x ~ (xq - zp) * scale per row, with 256 levels over [min(x, 0), max(x, 0)] (0 stays exact).
    The operations and their order are the kernel's (csrc/cpu/int8_linear.cpp, row_params), so
    both round to the same xq: division by 255 and the reciprocal in float32, x * (1 / scale)
    rounded half to even.
    """
    x = x.float()
    lo = x.amin(dim=1).clamp(max=0) if x.shape[1] else x.new_zeros(x.shape[0])
    hi = x.amax(dim=1).clamp(min=0) if x.shape[1] else x.new_zeros(x.shape[0])
    scale = (hi - lo) / _LEVELS
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    inv = 1 / scale
    zp = torch.round(-lo * inv).clamp(0, _LEVELS)
    xq = (torch.round(x * inv[:, None]) + zp[:, None]).clamp(0, _LEVELS)
    return xq, scale, zp


def int8_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """What `int8_linear` computes, in torch; qweight is the plain [N, K] int8 tensor.

    y[m, n] = float(sum_k (xq[m, k] - zp[m]) q[n, k]) * (scale[m] * scales[n]) + bias[n]

    The integer sum is exact here (float64) as in the kernel (int32), so the two agree to float32
    rounding (the kernel may fuse the last multiply-add).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, scale, zp = quantize_activations_reference(x2)
    acc = (xq.double() - zp.double()[:, None]) @ qweight.double().T
    y = acc.float() * (scale[:, None] * scales.float()[None, :])
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], qweight.shape[0])


def dequantize_int8_per_channel(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight the int8 one stands for: qweight * scales[:, None]."""
    return qweight.float() * scales.float()[:, None]


@torch.library.register_fake("sgl_kernel::int8_pack")
def _(qweight: torch.Tensor) -> torch.Tensor:
    n, k = qweight.shape
    return qweight.new_empty(((n + 15) // 16, (k + 3) // 4 + 1, 64))


@torch.library.register_fake("sgl_kernel::int8_linear")
def _(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], scales.shape[0]))
