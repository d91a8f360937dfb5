"""Linear layers on GGUF's quantized blocks (csrc/cpu/gguf_linear.cpp) and their torch reference.

A GGUF weight [N, K] of type Q4_0, Q4_1 or Q8_0 is stored as N rows of K / 32 blocks; each block
holds 32 weights and its own fp16 scale (Q4_1 also an fp16 offset). The kernel keeps those bytes
(repacked for vpdpbusd, not dequantized), quantizes each row of x per 32-block to int8 and
computes integer dot products per block, so `gguf_linear_reference` below, which does the same
steps in torch, matches it to float rounding. Against `F.linear(x, dequantize_blocks(...))` the
difference is the activations' quantization error.

Typical use: pack once at load, then call with the packed weight.

    packed = gguf_pack(raw, GGML_Q4_1)                # raw: uint8 [N, K / 32 * 20] from the file
    y = gguf_linear(x, packed, GGML_Q4_1, n, k, bias)  # x [..., K] float32 or bfloat16
"""

from __future__ import annotations

import torch

# ggml's type ids, as in a GGUF file's tensor info.
GGML_Q4_0 = 2
GGML_Q4_1 = 3
GGML_Q8_0 = 8

BLOCK_SIZE = 32  # weights per block
BLOCK_BYTES = {GGML_Q4_0: 18, GGML_Q4_1: 20, GGML_Q8_0: 34}
NAMES = {GGML_Q4_0: "Q4_0", GGML_Q4_1: "Q4_1", GGML_Q8_0: "Q8_0"}

# The packed layout (see gguf_linear.cpp): per group of 16 rows and block, quant lines of 64
# bytes and scale bytes (fp16 d, and m for Q4_1), the scales of 64 / S blocks on one line.
_LINES = {GGML_Q4_0: 4, GGML_Q4_1: 4, GGML_Q8_0: 8}
_SCALE_BYTES = {GGML_Q4_0: 32, GGML_Q4_1: 64, GGML_Q8_0: 32}


def _check_qtype(qtype: int) -> None:
    if qtype not in BLOCK_BYTES:
        supported = ", ".join(f"{name} ({t})" for t, name in NAMES.items())
        raise ValueError(f"GGUF type {qtype} is not supported; supported: {supported}")


def packed_shape(n: int, k: int, qtype: int) -> tuple[int, int, int]:
    """The shape `gguf_pack` returns for an [N, K] weight: [ceil(N/16), lines, 64]."""
    _check_qtype(qtype)
    kb = k // BLOCK_SIZE
    lines = kb * _LINES[qtype] + -(-kb * _SCALE_BYTES[qtype] // 64)
    return (n + 15) // 16, lines, 64


def gguf_pack(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """uint8 [N, K / 32 * BLOCK_BYTES[qtype]] (the file's bytes) -> the kernel's layout."""
    return torch.ops.sgl_kernel.gguf_pack(raw, qtype)


def gguf_linear_path() -> str:
    """The kernel gguf_linear runs in this process: avx512_vnni, avx2 or scalar."""
    return torch.ops.sgl_kernel.gguf_linear_path()


def gguf_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    qtype: int,
    n: int,
    k: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ W.T + bias -> [..., N] in x's dtype, W the GGUF weight [N, K].

    `weight` is packed (from `gguf_pack`) or the raw uint8 [N, row_bytes] blocks, which are then
    packed on every call (fine for tests; layers pack once). K must be a multiple of 32.
    """
    return torch.ops.sgl_kernel.gguf_linear(x, weight, qtype, n, k, bias)


def _blocks(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """uint8 [R, row_bytes] -> [R, KB, BLOCK_BYTES] (a view when raw is contiguous)."""
    _check_qtype(qtype)
    bb = BLOCK_BYTES[qtype]
    assert raw.dtype == torch.uint8 and raw.dim() == 2 and raw.shape[1] % bb == 0, (
        f"expected uint8 [rows, KB * {bb}] {NAMES[qtype]} blocks, got {raw.dtype} "
        f"{tuple(raw.shape)}"
    )
    return raw.reshape(raw.shape[0], raw.shape[1] // bb, bb)


def _half(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 little-endian fp16 bytes -> [...] float32."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] uint8 -> [..., 32] in 0..15: the low nibbles are weights 0..15, high 16..31."""
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def _unsigned_weights(raw: torch.Tensor, qtype: int) -> tuple[torch.Tensor, ...]:
    """(u [R, KB, 32] the kernel's unsigned weight values as float32, d [R, KB], m [R, KB] or None).

    u is the nibble for Q4 and q + 128 (q ^ 0x80) for Q8_0; w = d (u - 8), d u + m, d (u - 128).
    """
    blocks = _blocks(raw, qtype)
    d = _half(blocks[..., 0:2])
    if qtype == GGML_Q8_0:
        return blocks[..., 2:].view(torch.int8).float() + 128, d, None
    if qtype == GGML_Q4_0:
        return _nibbles(blocks[..., 2:]).float(), d, None
    return _nibbles(blocks[..., 4:]).float(), d, _half(blocks[..., 2:4])


def dequantize_blocks(raw: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """uint8 [R, K / 32 * BLOCK_BYTES[qtype]] GGUF rows -> float32 [R, K].

    Any rows will do (a gathered subset such as raw[idx] for an embedding lookup).
    """
    u, d, m = _unsigned_weights(raw, qtype)
    assert u.shape[1] * BLOCK_SIZE == k, f"rows hold {u.shape[1] * BLOCK_SIZE} weights, not K = {k}"
    if qtype == GGML_Q4_1:
        w = d[..., None] * u + m[..., None]
    else:
        w = d[..., None] * (u - (8 if qtype == GGML_Q4_0 else 128))
    return w.reshape(raw.shape[0], k)


def quantize_activations_reference(
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[M, K] -> (q [M, KB, 32] in -127..127, d [M, KB], sum of q [M, KB]), all float32.

    x ~ q * d per 32-block with d = max|x| / 127 (1 for an all-zero block) and
    q = round-half-even(x / d): the kernel's steps (gguf_linear.cpp, quantize_one), so both
    round to the same q. q and its sums are integers, exact in float32.
    """
    xb = x.float().reshape(x.shape[0], -1, BLOCK_SIZE)
    d = xb.abs().amax(dim=-1) / 127
    d = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.round(xb / d[..., None]).clamp_(-127, 127)
    return q, d, q.sum(dim=-1)


def gguf_linear_reference(
    x: torch.Tensor,
    raw: torch.Tensor,
    qtype: int,
    k: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """What `gguf_linear` computes, in torch; raw is the uint8 [N, row_bytes] GGUF weight.

    Per block b, with dot = sum_j u[n, b, j] q[m, b, j] exact (int32 in the kernel; float32 here,
    exact too: every partial sum is an integer below 32 * 255 * 127 < 2^24):
      Q4_0: d_w d_x (dot - 8 sum q)    Q8_0: d_w d_x (dot - 128 sum q)
      Q4_1: d_w d_x dot + m_w (d_x sum q)
    summed over blocks in float32 (the kernel's order and fused multiply-adds differ only in
    rounding), then + bias, in x's dtype.
    """
    shape = x.shape
    assert shape[-1] == k and k % BLOCK_SIZE == 0, f"x has {shape[-1]} features, K = {k}"
    u, dw, mw = _unsigned_weights(raw, qtype)
    q, dx, sx = quantize_activations_reference(x.reshape(-1, k))
    dot = torch.einsum("mbj,nbj->mnb", q, u)  # [M, N, KB]
    scale = dx[:, None, :] * dw[None, :, :]
    if qtype == GGML_Q4_1:
        terms = scale * dot + mw[None, :, :] * (dx * sx)[:, None, :]
    else:
        terms = scale * (dot - (8 if qtype == GGML_Q4_0 else 128) * sx[:, None, :])
    y = terms.sum(dim=-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], raw.shape[0])


def gguf_pack_reference(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """What `gguf_pack` returns, in torch (the layout is pictured in csrc/cpu/gguf_linear.cpp).

    Group g holds rows 16g..16g+15. Per block, its lines: line j holds bytes 4j..4j+3 of each
    row's qs (16 rows x 4 bytes; Q8_0's XOR 0x80); per unit of 64 / S blocks (S: scale bytes per
    block), the blocks' lines, then one line of their fp16 scales (d of the 16 rows, then m).
    """
    blocks = _blocks(raw, qtype)
    n, kb, bb = blocks.shape
    ng = (n + 15) // 16
    padded = torch.zeros(ng * 16, kb, bb, dtype=torch.uint8)
    padded[:n] = blocks
    nl = _LINES[qtype]
    qs = padded[..., bb - 4 * nl :]  # [ng * 16, kb, 4 nl]
    if qtype == GGML_Q8_0:
        qs[:n] ^= 0x80  # rows past N stay zero
    quants = qs.reshape(ng, 16, kb, nl, 4).permute(0, 2, 3, 1, 4).reshape(ng, kb, nl * 64)
    heads = padded[..., : bb - 4 * nl].reshape(ng, 16, kb, -1, 2)  # d (and m): [.., 1 or 2, 2]
    scales = heads.permute(0, 2, 3, 1, 4).reshape(ng, kb, -1)  # [ng, kb, S]
    per_unit = 64 // _SCALE_BYTES[qtype]
    units = []
    for first in range(0, kb, per_unit):
        last = min(first + per_unit, kb)
        line = torch.zeros(ng, 64, dtype=torch.uint8)
        line[:, : (last - first) * _SCALE_BYTES[qtype]] = scales[:, first:last].reshape(ng, -1)
        units += [quants[:, first:last].reshape(ng, -1), line]
    return torch.cat(units, dim=1).view(packed_shape(n, kb * BLOCK_SIZE, qtype))


@torch.library.register_fake("sgl_kernel::gguf_pack")
def _(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    _check_qtype(qtype)
    n, row_bytes = raw.shape
    return raw.new_empty(packed_shape(n, row_bytes // BLOCK_BYTES[qtype] * BLOCK_SIZE, qtype))


@torch.library.register_fake("sgl_kernel::gguf_linear")
def _(
    x: torch.Tensor,
    weight: torch.Tensor,
    qtype: int,
    n: int,
    k: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))
