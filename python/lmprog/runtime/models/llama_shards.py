"""Which part of each HF Llama-family weight a tensor-parallel rank holds, and where it goes.

`source(name)` is the slice of the checkpoint tensor the rank reads (None: all of it), in
the model's HF names; `fused_rows(shard)` where a q/k/v or gate/up slice lands in the rank's
fused qkv_proj / gate_up_proj weight:

    qkv_proj rows:      [ q: heads * D | k: kv_heads * D | v: kv_heads * D ]    (this rank's)
    gate_up_proj rows:  [ gate: I / N | up: I / N ]

Column-parallel weights (q/k/v, gate/up, their biases) are sliced by rows (dim 0), row-parallel
ones (o_proj, down_proj) by columns (dim 1); their biases are held by rank 0 alone, so the
all-reduce adds them once. Embedding and untied LM head rows are the rank's vocabulary shard,
loaded into the first rows of its padded table. Everything else (norms, a classifier's score
head) is whole on every rank.
"""

from __future__ import annotations

from typing import Any

from lmprog.runtime.distributed.parallel_state import TpGroup
from lmprog.runtime.distributed.partition import split_attention, split_evenly, vocab_rows
from lmprog.runtime.model_loader.safetensors_io import Shard

VOCAB_WEIGHTS = ("model.embed_tokens.weight", "lm_head.weight")


class LlamaShards:
    def __init__(self, config: Any, tp: TpGroup) -> None:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        d = getattr(config, "head_dim", None) or config.hidden_size // heads
        split = split_attention(heads, kv_heads, tp.rank, tp.size)
        self.tp = tp
        self.q = (split.head_start * d, (split.head_start + split.heads) * d)
        self.kv = (split.kv_head_start * d, (split.kv_head_start + split.kv_heads) * d)
        self.inter = split_evenly(config.intermediate_size, tp.rank, tp.size, "intermediate_size")
        self.vocab = vocab_rows(config.vocab_size, tp.rank, tp.size)[:2]

    def fused_rows(self, shard: str) -> slice:
        """Rows of the rank's fused weight that checkpoint shard `shard` (q, k, v, gate, up)
        fills."""
        q, kv = self.q[1] - self.q[0], self.kv[1] - self.kv[0]
        inter = self.inter[1] - self.inter[0]
        return {
            "q": slice(0, q),
            "k": slice(q, q + kv),
            "v": slice(q + kv, q + 2 * kv),
            "gate": slice(0, inter),
            "up": slice(inter, 2 * inter),
        }[shard]

    def vocab_target_rows(self) -> slice:
        return slice(0, self.vocab[1] - self.vocab[0])

    def held_elsewhere(self, name: str) -> bool:
        """A row-parallel bias on a rank other than 0 (rank 0 adds it after the reduce)."""
        return self.tp.rank != 0 and name.endswith(("o_proj.bias", "down_proj.bias"))

    def source(self, name: str) -> Shard | None:
        """The slice of checkpoint tensor `name` this rank reads; None: the whole tensor."""
        if not self.tp.is_sharded:
            return None
        if name in VOCAB_WEIGHTS:
            return (0, *self.vocab)
        parts = name.rsplit(".", 2)
        if len(parts) < 3:
            return None
        module, kind = parts[1], parts[2]
        columns = {"q_proj": self.q, "k_proj": self.kv, "v_proj": self.kv}
        columns |= {"gate_proj": self.inter, "up_proj": self.inter}
        if module in columns:
            return (0, *columns[module])
        rows = {"o_proj": self.q, "down_proj": self.inter}
        if module in rows and kind == "weight":
            return (1, *rows[module])
        return None
