"""How a Llama-family model splits across tensor-parallel ranks (Megatron style).

    qkv_proj, gate_up_proj   column-parallel: each rank computes its heads / its columns
    o_proj, down_proj        row-parallel: each rank multiplies its slice of the inputs, the
                             partial sums are all-reduced (a bias is added once, by rank 0)
    embed_tokens, lm_head    vocab-parallel: each rank holds ceil(V / N) rows of the vocabulary

Query heads split evenly. KV heads split evenly when there are at least as many as ranks;
with fewer, each rank holds one KV head, shared by N / kv_heads consecutive ranks (replicated):

    8 query heads, 2 KV heads, 4 ranks:   rank      0     1     2     3
                                          q heads  0-1   2-3   4-5   6-7
                                          kv head   0     0     1     1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AttentionSplit:
    """One rank's share of a layer's attention heads."""

    heads: int  # query heads on this rank
    kv_heads: int  # KV heads on this rank
    head_start: int  # the model's index of this rank's first query head
    kv_head_start: int  # ... and of its first KV head


def split_attention(num_heads: int, num_kv_heads: int, rank: int, size: int) -> AttentionSplit:
    """Rank `rank` of `size`'s heads; ValueError when `size` cannot split them."""
    if num_heads % size:
        raise ValueError(
            f"tensor_parallel_size {size} must divide the model's attention heads: it has "
            f"{num_heads} query heads and {num_kv_heads} KV heads"
        )
    if num_kv_heads >= size and num_kv_heads % size:
        raise ValueError(
            f"tensor_parallel_size {size} must divide the model's {num_kv_heads} KV heads "
            f"(it has {num_heads} query heads)"
        )
    if num_kv_heads < size and size % num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size {size} must be a multiple of the model's {num_kv_heads} KV "
            f"heads when it exceeds them (it has {num_heads} query heads)"
        )
    heads = num_heads // size
    if num_kv_heads >= size:
        kv_heads = num_kv_heads // size
        return AttentionSplit(heads, kv_heads, rank * heads, rank * kv_heads)
    return AttentionSplit(heads, 1, rank * heads, rank // (size // num_kv_heads))


def split_evenly(total: int, rank: int, size: int, what: str) -> tuple[int, int]:
    """[start, stop) of rank's equal share of `total` (`what` names it in the error)."""
    if total % size:
        raise ValueError(f"tensor_parallel_size {size} must divide the model's {what} ({total})")
    share = total // size
    return rank * share, (rank + 1) * share


def vocab_rows(vocab_size: int, rank: int, size: int) -> tuple[int, int, int]:
    """(start, stop, padded rows) of rank's vocabulary shard: every rank holds `padded` rows,
    of which [start, stop) are real; the last rank's tail is padding (zeros)."""
    padded = -(-vocab_size // size)
    start = min(rank * padded, vocab_size)
    return start, min(start + padded, vocab_size), padded


def check_llama_split(config: Any, size: int) -> None:
    """Fails with the head counts when a Llama-family config cannot run on `size` ranks."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    split_attention(heads, kv_heads, 0, size)
    split_evenly(config.intermediate_size, 0, size, "intermediate_size")
