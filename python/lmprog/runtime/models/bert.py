"""The BERT encoder (HF `BertModel`), as sentence-transformers embedders use it (all-MiniLM-L6-v2).

A forward runs in ForwardMode.ENCODE: the step's tokens are the whole of each sequence, attention
is non-causal within each sequence (the backend's encode mode) and no KV is kept. The output is
the last layer's hidden states of every token; pooling them into one vector per sequence is the
pooler's job, not the model's (HF's `pooler.*` weights are not loaded).

    embeddings = LayerNorm(word[id] + token_type[0] + position[pos])
    each layer (post-LayerNorm):
        h = LayerNorm(h + o_proj(attention(qkv_proj(h))))
        h = LayerNorm(h + down_proj(act(up_proj(h))))

Token type ids are 0 (embedders encode one segment per sequence) unless the step carries them:
a cross-encoder's pair is segment 0 then segment 1. Layout as in llama.py:
one fused qkv matmul per layer, which `load_weights` fills from HF's separate query/key/value.

For the model runner: `is_encoder` selects encode mode; `num_layers`, `num_kv_heads` and
`head_dim` size a (nominal) KV pool, `max_context_len` bounds sequences.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmprog.runtime.layers.attention.base import RadixAttention
from lmprog.runtime.layers.linear import linear, uninitialized
from lmprog.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode
from lmprog.runtime.models.weight_loading import expected_keys, load_named_weights

# HF weights not used here: the pooler (a tanh dense over [CLS], unused by sentence-transformers'
# mean pooling), masked-LM / NSP heads, and the position_ids buffer.
_SKIPPED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids")

# HF's per-layer module (after `encoder.layer.N.`) -> (ours, after `layers.N.`; qkv shard or None).
_LAYER_PARAMS: dict[str, tuple[str, str | None]] = {
    "attention.self.query": ("qkv_proj", "q"),
    "attention.self.key": ("qkv_proj", "k"),
    "attention.self.value": ("qkv_proj", "v"),
    "attention.output.dense": ("o_proj", None),
    "attention.output.LayerNorm": ("attn_norm", None),
    "intermediate.dense": ("up_proj", None),
    "output.dense": ("down_proj", None),
    "output.LayerNorm": ("mlp_norm", None),
}
_HF_LAYER_NAME = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "gelu":
        return F.gelu  # exact, through erf
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return functools.partial(F.gelu, approximate="tanh")
    raise NotImplementedError(
        f"hidden_act {name!r} (supported: 'gelu', 'gelu_new', 'gelu_pytorch_tanh')"
    )


def _layer_norm(config: Any, dtype: torch.dtype) -> nn.LayerNorm:
    return uninitialized(nn.LayerNorm, config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)


class BertEmbeddings(nn.Module):
    """Attributes are named as HF's, so `embeddings.*` checkpoint names load unchanged."""

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.word_embeddings = uninitialized(nn.Embedding, config.vocab_size, hidden, dtype=dtype)
        self.position_embeddings = uninitialized(
            nn.Embedding, config.max_position_embeddings, hidden, dtype=dtype
        )
        self.token_type_embeddings = uninitialized(
            nn.Embedding, config.type_vocab_size, hidden, dtype=dtype
        )
        self.LayerNorm = _layer_norm(config, dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if token_type_ids is None:
            types = self.token_type_embeddings.weight[0]
        else:
            types = self.token_type_embeddings(token_type_ids)
        # Summed in HF's order (word + token type, then position) so float rounding matches.
        hidden = self.word_embeddings(input_ids) + types
        hidden += self.position_embeddings(positions)
        return self.LayerNorm(hidden)


class BertLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        assert hidden % heads == 0, f"hidden size {hidden} is not a multiple of {heads} heads"
        self.hidden_size = hidden
        self.qkv_proj = linear(hidden, 3 * hidden, True, dtype)  # rows: q, then k, then v
        self.attn = RadixAttention(layer_id, heads, hidden // heads, heads)
        self.o_proj = linear(hidden, hidden, True, dtype)
        self.attn_norm = _layer_norm(config, dtype)
        self.up_proj = linear(hidden, config.intermediate_size, True, dtype)
        self.act_fn = _activation(config.hidden_act)
        self.down_proj = linear(config.intermediate_size, hidden, True, dtype)
        self.mlp_norm = _layer_norm(config, dtype)

    def forward(self, hidden: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.hidden_size, dim=-1)
        hidden = self.attn_norm(hidden + self.o_proj(self.attn(q, k, v, fb)))
        return self.mlp_norm(hidden + self.down_proj(self.act_fn(self.up_proj(hidden))))


class BertModel(nn.Module):
    """`forward(forward_batch)` -> float32 hidden states [T, hidden], one row per token.

    Invariants: the batch is in ENCODE mode (each request's tokens are its whole sequence, from
    position 0), its attention backend is set and `init_forward_metadata` has run. `dtype`
    defaults to float32.
    """

    is_encoder = True

    def __init__(self, config: Any, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dtype = dtype or torch.float32
        self.config = config
        self.num_layers: int = config.num_hidden_layers
        self.num_kv_heads: int = config.num_attention_heads
        self.head_dim: int = config.hidden_size // config.num_attention_heads
        self.max_context_len: int = config.max_position_embeddings
        self.embeddings = BertEmbeddings(config, dtype)
        self.layers = nn.ModuleList(BertLayer(config, i, dtype) for i in range(self.num_layers))
        self.requires_grad_(False)

    def forward(self, forward_batch: ForwardBatch) -> torch.Tensor:
        fb = forward_batch
        assert fb.forward_mode is ForwardMode.ENCODE, (
            f"BERT runs in encode mode, not {fb.forward_mode}"
        )
        longest = max(fb.seq_lens_cpu)
        if longest > self.max_context_len:
            raise ValueError(
                f"a sequence has {longest} tokens; the model's context is {self.max_context_len}"
            )
        hidden = self.embeddings(fb.input_ids, fb.positions, fb.token_type_ids)
        for layer in self.layers:
            hidden = layer(hidden, fb)
        return hidden.float()

    def _target(self, name: str) -> tuple[str, slice, str] | None:
        """HF name -> (our parameter, its rows, key in the loaded set); None: not used here."""
        name = name.removeprefix("bert.")  # BertForMaskedLM-style checkpoints nest the encoder
        if name.startswith(_SKIPPED_PREFIXES):
            return None
        match = _HF_LAYER_NAME.fullmatch(name)
        if match is None or match.group(2) not in _LAYER_PARAMS:
            return name, slice(None), name  # embeddings.*: same names; anything else fails
        layer, module, kind = match.groups()
        ours, shard = _LAYER_PARAMS[module]
        target = f"layers.{layer}.{ours}.{kind}"
        if shard is None:
            return target, slice(None), target
        q_rows = self.config.hidden_size
        start = "qkv".index(shard) * q_rows
        return target, slice(start, start + q_rows), f"{target}[{shard}]"

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies HF-named weights in; fails on an unknown name, a wrong shape or a missing one."""
        expected = expected_keys(self, {"qkv_proj": "qkv"})
        load_named_weights(self, weights, self._target, expected, "bert")
