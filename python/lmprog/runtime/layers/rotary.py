"""Rotary position embedding (RoPE) in HF Llama's "rotate-half" layout.

A head vector x of size D is split into halves (x1, x2) = (x[:D/2], x[D/2:]); frequency i of the
D/2 frequencies rotates the pair (x1[i], x2[i]) by angle `pos * inv_freq[i]`:

    out[:D/2] = x1 * cos - x2 * sin
    out[D/2:] = x2 * cos + x1 * sin        (= x * cat(cos, cos) + rotate_half(x) * cat(sin, sin))

cos/sin are tabulated once per position ([max_pos, D/2] each, float32) and looked up by
`positions`; the table grows on demand past `max_position_embeddings`. The model looks the
rows up once per step and every layer reuses them.

Supported `rope_type`s: default, linear, llama3. "dynamic" (NTK) is deliberately not: HF
recomputes its frequencies from the longest sequence of each batch, so keys cached in the KV
pool by an earlier step would have been rotated with different frequencies than the queries
that read them; it cannot be exact under a prefix cache.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config: Any) -> dict[str, Any]:
    """The config's rope settings as one dict with at least `rope_type` and `rope_theta`.

    transformers >= 5 keeps them in `config.rope_parameters`; older configs have `rope_theta`
    plus an optional `rope_scaling` dict (whose type key was once spelled `type`).
    """
    params = getattr(config, "rope_parameters", None)
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    if "rope_theta" not in params:  # a per-layer-type dict (Gemma-style): not a Llama config
        raise ValueError(f"unsupported rope_parameters layout: {sorted(params)}")
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    return params


def compute_inv_freq(params: dict[str, Any], head_dim: int, max_position: int) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies, computed exactly as transformers does.

    `max_position` is `original_max_position_embeddings`'s fallback for llama3 scaling.
    """
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"rope_type {rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError(
            f"partial_rotary_factor {params['partial_rotary_factor']} is not supported (only 1.0)"
        )
    base = float(params["rope_theta"])
    # Same op order as transformers (int arange -> float -> divide -> pow) so the tables match
    # its cos/sin bit for bit.
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base**exponent)
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, params, max_position)
    return inv_freq


def _llama3_inv_freq(
    inv_freq: torch.Tensor, params: dict[str, Any], max_position: int
) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by `factor`, short kept, a smooth ramp between."""
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_context = params.get("original_max_position_embeddings", max_position)
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


@dataclass(frozen=True)
class RopeRows:
    """The cos/sin rows of one step's positions, looked up once and used by every layer:
    `cos32`/`sin32` float32 [T, D/2] (what the fused kernel takes) and `cos`/`sin` in the
    activation dtype, [T, 1, D/2] to broadcast over heads (what `RotaryEmbedding.apply` takes).
    The latter are made on first use: the fused paths (the kernel, the C++ decode stack) never
    read them."""

    cos32: torch.Tensor
    sin32: torch.Tensor
    dtype: torch.dtype

    @functools.cached_property
    def cos(self) -> torch.Tensor:
        return self.cos32.to(self.dtype)[:, None, :]

    @functools.cached_property
    def sin(self) -> torch.Tensor:
        return self.sin32.to(self.dtype)[:, None, :]


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE over the full head dimension, with a lazily grown cos/sin table.

    Invariant: `cos_cache`/`sin_cache` are [n, head_dim / 2] float32 with n >= every position
    passed to `cos_sin` (guaranteed by calling `ensure(max_seq_len)` first).
    """

    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any]) -> None:
        super().__init__()
        assert head_dim % 2 == 0, f"head_dim {head_dim} must be even for rotate-half RoPE"
        self.head_dim = head_dim
        self.rope_type = params["rope_type"]
        self.inv_freq = compute_inv_freq(params, head_dim, max_position)
        # Non-persistent buffers: moved by .to(device), never expected in a checkpoint.
        self.register_buffer("cos_cache", torch.empty(0, head_dim // 2), persistent=False)
        self.register_buffer("sin_cache", torch.empty(0, head_dim // 2), persistent=False)
        self.ensure(max_position)

    def ensure(self, num_positions: int) -> None:
        """Grows the table (to at least double, to amortize) so positions < n can be looked up."""
        have = self.cos_cache.shape[0]
        if num_positions <= have:
            return
        n = max(num_positions, 2 * have)
        device = self.cos_cache.device
        # position * inv_freq in float32, then cos/sin: the same values HF computes per step.
        freqs = torch.arange(n, dtype=torch.float32, device=device)[:, None] * self.inv_freq.to(
            device
        )
        self.cos_cache, self.sin_cache = freqs.cos(), freqs.sin()

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin rows for `positions` [T]: each [T, 1, head_dim / 2], broadcast over heads."""
        rows = self.rows(positions, dtype)
        return rows.cos, rows.sin

    def rows(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeRows:
        """Both forms of the rows for `positions` [T] (see RopeRows)."""
        # .float(): a bf16 model's `.to(dtype)` casts the tables too; a bf16-rounded cos rounds
        # to the same bf16 value again, so either table gives the reference's numbers.
        cos32, sin32 = self.cos_cache[positions].float(), self.sin_cache[positions].float()
        return RopeRows(cos32, sin32, dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotates x [T, heads, D] (any strides) into a new contiguous tensor.

        Four fused multiply(-add) kernels writing straight into the two output halves: no
        rotate_half copy and no temporaries.
        """
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        o1, o2 = out[..., :half], out[..., half:]
        torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1.0)
        torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
        return out

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Convenience: rotates q [T, H, D] and k [T, Hkv, D] at `positions` [T]."""
        cos, sin = self.cos_sin(positions, q.dtype)
        return self.apply(q, cos, sin), self.apply(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rope_type={self.rope_type}"
