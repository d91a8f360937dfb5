"""Per-step forward state: set once per step, read by every layer.

A step runs one batch of requests in one mode. Tokens of all requests are flattened into one
sequence of `T` new tokens:

    request:        r0            r1        r2
    new tokens:   [a a a a]     [b b]     [c c c]        T = 9
    prefix (KV):  p0 cached     p1        p2             (already in the KV pool, not recomputed)

`extend_seq_lens[i]` new tokens of request i start at position `extend_prefix_lens[i]`;
after the step, request i has `seq_lens[i] = extend_prefix_lens[i] + extend_seq_lens[i]` tokens of
KV in the pool. A decode step is the special case where every request adds exactly one token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lmprog.runtime.host_copy import to_device_packed

if TYPE_CHECKING:
    from lmprog.runtime.layers.attention.base import AttentionBackend
    from lmprog.runtime.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPool


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prefill of new tokens over an (optionally) cached prefix
    DECODE = "decode"  # one new token per request
    ENCODE = "encode"  # non-causal encoder pass that keeps no KV (BERT-style embedders)

    @property
    def is_decode(self) -> bool:
        return self is ForwardMode.DECODE

    @property
    def is_extend(self) -> bool:
        return self is ForwardMode.EXTEND


# The per-step int64 index tensors, in the order `build` packs them for one copy.
INDEX_FIELDS = (
    "input_ids",
    "positions",
    "req_pool_indices",
    "seq_lens",
    "extend_prefix_lens",
    "extend_seq_lens",
    "out_cache_loc",
)


@dataclass
class ForwardBatch:
    """Everything a model forward needs for one step; built by the ModelRunner's caller."""

    forward_mode: ForwardMode
    input_ids: torch.Tensor  # [T] int64, the new tokens of every request, flattened
    positions: torch.Tensor  # [T] int64, the position of each new token in its sequence
    req_pool_indices: torch.Tensor  # [B] int64, each request's row in ReqToTokenPool
    seq_lens: torch.Tensor  # [B] int64, tokens of KV per request after this step
    extend_prefix_lens: torch.Tensor  # [B] int64, tokens already cached before this step
    extend_seq_lens: torch.Tensor  # [B] int64, new tokens this step (all 1 in decode)
    out_cache_loc: torch.Tensor  # [T] int64, KV slot where each new token's K/V is written
    # Host copies of the lengths, so backends can size buffers without a device sync.
    seq_lens_cpu: list[int]
    extend_prefix_lens_cpu: list[int]
    extend_seq_lens_cpu: list[int]
    req_to_token_pool: ReqToTokenPool | None = None
    token_to_kv_pool: TokenToKVPool | None = None
    attn_backend: AttentionBackend | None = None
    # Rows of the flattened hidden states to compute logits for. None = the last new token of
    # each request (what sampling needs). Tests and input-logprob requests ask for more.
    logits_indices: torch.Tensor | None = None
    # [T] int64 segment ids of the tokens (a BERT cross-encoder's text pair); None: all 0.
    token_type_ids: torch.Tensor | None = None
    # Backend-specific per-step metadata (index tables, masks), set by init_forward_metadata.
    attn_metadata: Any = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def last_token_indices(self) -> torch.Tensor:
        """Index in the flattened tokens of each request's last new token."""
        return torch.cumsum(self.extend_seq_lens, dim=0) - 1

    @classmethod
    def build(
        cls,
        mode: ForwardMode,
        input_ids: list[int],
        req_pool_indices: list[int],
        prefix_lens: list[int],
        extend_lens: list[int],
        out_cache_loc: torch.Tensor,
        device: torch.device,
        **kwargs: Any,
    ) -> ForwardBatch:
        """Builds the tensors from host lists (the usual path from the scheduler and tests)."""
        assert len(req_pool_indices) == len(prefix_lens) == len(extend_lens), "ragged batch"
        # Encode keeps no KV: it may be given no slots.
        slots = {len(input_ids), 0} if mode is ForwardMode.ENCODE else {len(input_ids)}
        assert sum(extend_lens) == len(input_ids) and out_cache_loc.numel() in slots, (
            f"{sum(extend_lens)} extend tokens, {len(input_ids)} ids, "
            f"{out_cache_loc.numel()} cache slots"
        )
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        positions = torch.cat(
            [torch.arange(p, s, dtype=torch.int64) for p, s in zip(prefix_lens, seq_lens)]
        )
        # Every index tensor of the step in one host-to-device copy (host_copy.py).
        tensors = to_device_packed(
            [input_ids, positions, req_pool_indices, seq_lens, prefix_lens, extend_lens,
             out_cache_loc.to("cpu")],
            torch.int64,
            torch.device(device),
        )  # fmt: skip
        return cls.from_index_tensors(mode, tensors, prefix_lens, extend_lens, **kwargs)

    @classmethod
    def from_index_tensors(
        cls,
        mode: ForwardMode,
        tensors: list[torch.Tensor],
        prefix_lens: list[int],
        extend_lens: list[int],
        **kwargs: Any,
    ) -> ForwardBatch:
        """A batch from its INDEX_FIELDS tensors, in that order, already on the device, and
        the host lengths (what `build` makes, and what a tensor-parallel rank receives)."""
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        return cls(
            forward_mode=mode,
            **dict(zip(INDEX_FIELDS, tensors, strict=True)),
            seq_lens_cpu=seq_lens,
            extend_prefix_lens_cpu=list(prefix_lens),
            extend_seq_lens_cpu=list(extend_lens),
            **kwargs,
        )
