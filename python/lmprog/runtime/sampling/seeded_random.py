"""Counter-based randomness for seeded sampling: the exponential race.

A sample from softmax(scores) is argmax_j (scores_j - log E_j) with E_j ~ Exp(1) i.i.d. Here
E_j is a pure function of (seed, step, token id), so a row's draw never depends on its batch
position or on other rows, and needs no per-row torch.Generator.
"""

from __future__ import annotations

import torch

# -- seeded randomness: the exponential race ------------------------------------------------
#
# A row's key is splitmix64(splitmix64(seed) + step * golden) (int64 ops, [B] elements).
# Each (row, vocab id) then hashes (vocab_table[id] ^ key32) with a multiply-xorshift-
# multiply mix in int32 (half the memory traffic of int64 over B x V elements); its top
# 24 bits give w in (0, 1) and E = -log1p(-w) ~ Exp(1). torch integer arithmetic wraps
# (two's complement) on CPU and CUDA; right shifts are arithmetic, so they are masked.

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # splitmix64's increment, as a signed int64
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_HASH1 = 0x7FEB352D  # multipliers of Wellons' lowbias32, as signed int32
_HASH2 = 0x846CA68B - (1 << 32)
_TABLE_SALT = 0x5BD1E995
_vocab_tables: dict[tuple[torch.device, int], torch.Tensor] = {}


def _shift_right(x: torch.Tensor, bits: int, width: int = 64) -> torch.Tensor:
    """Logical right shift of a signed `width`-bit tensor."""
    return (x >> bits).bitwise_and_((1 << (width - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on an int64 tensor (a bijection with full avalanche)."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def _low32(x: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of an int64 tensor as int32 (sign-extended first, so the cast is exact)."""
    return (((x & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000).to(torch.int32)


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """int32 key per row from its 64-bit seed and step (tokens generated so far)."""
    return _low32(mix64(mix64(seeds + _GOLDEN) + steps * _GOLDEN))


def _vocab_table(vocab: int, device: torch.device) -> torch.Tensor:
    """A fixed pseudo-random int32 per vocab id (cached per device and size)."""
    key = (device, vocab)
    if key not in _vocab_tables:
        ids = torch.arange(vocab, dtype=torch.int64, device=device)
        _vocab_tables[key] = _low32(mix64(ids * _GOLDEN + _TABLE_SALT))
    return _vocab_tables[key]


def log_exponentials(keys: torch.Tensor, ids: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """log E for E ~ Exp(1) per (row, token): [n, K] for token ids [n, K], or [n, vocab]
    for every token when ids is None. A pure function of (key, token id)."""
    table = _vocab_table(vocab, keys.device)
    x = (table[None, :] if ids is None else table[ids]) ^ keys[:, None]
    x.mul_(_HASH1)
    x ^= _shift_right(x, 15, width=32)
    x.mul_(_HASH2)
    # Top 24 bits, made odd: w = x / 2**24 is uniform over the midpoints of 2**23 cells
    # in (0, 1), never 0 or 1, and exact in float32.
    x.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF).bitwise_or_(1)
    neg_w = x * (-1.0 / (1 << 24))
    # E = -log(1 - w): log1p keeps E accurate when w is tiny (E ~ w), so E is never 0.
    return neg_w.log1p_().neg_().log_()


def race(
    scores: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor | None, vocab: int
) -> torch.Tensor:
    """argmax_j (scores_j - log E_j): the column of a sample from softmax(scores) per row.
    ids [n, K] names the token of each column (None: column j is token j)."""
    log_e = log_exponentials(keys, ids, vocab)
    return argmax_first(torch.sub(scores, log_e, out=log_e))


def argmax_first(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's maximum, the first one on ties. (`max(dim).indices` is
    documented to pick the first too, and runs ~30% faster than argmax on CPU.)"""
    return x.max(dim=-1).indices


_MASK64 = (1 << 64) - 1
_EMPTY = torch.empty(0, dtype=torch.int64)


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed for continuation `index` of a request seeded with `seed` (splitmix64)."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1
