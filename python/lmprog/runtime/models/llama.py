"""The Llama family over the paged KV pool: Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2.

One implementation; the members differ only in switches read from the HF config:

    model_type   q/k/v bias          o_proj bias       per-head q/k RMSNorm   head_dim
    llama        attention_bias      attention_bias    no                     config (or H/heads)
    mistral      no                  no                no                     config (or H/heads)
    qwen2        yes                 no                no                     H/heads
    qwen3        attention_bias      attention_bias    yes (before RoPE)      config.head_dim

Tied embeddings (SmolLM2, small Qwen) reuse `embed_tokens.weight` as the LM head.

Layout for speed on CPU: one fused qkv matmul and one fused gate_up matmul per layer
(`load_weights` stacks HF's separate q/k/v and gate/up weights into them); cos/sin rows are looked
up once per step for all layers; the residual stream is added in place inside the norms.

Not implemented: sliding-window attention (Mistral v0.1's 4096 window, Qwen's
`use_sliding_window`). Every layer attends to the whole context, which is exact only while
sequences stay within the window; a warning is logged when a config declares an active window.

For the model runner: `num_layers`, `num_kv_heads` and `head_dim` (instance attributes) size the
KV pool, `max_context_len` bounds sequences.

Tensor parallelism (distributed/): built under a sharded group, each rank holds its query and
KV heads, its MLP columns and its vocabulary rows (llama_shards.py says which); o_proj's and
down_proj's partial products are all-reduced, the logits gathered. Built alone, the same code
is the whole model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lmprog.runtime.distributed.parallel_state import TpGroup, current_tp
from lmprog.runtime.distributed.partition import split_attention, split_evenly
from lmprog.runtime.layers.activation import SiluAndMul
from lmprog.runtime.layers.attention.base import RadixAttention
from lmprog.runtime.layers.decode_stack import DecodeStack, stack_enabled
from lmprog.runtime.layers.kernels import kernels_for
from lmprog.runtime.layers.layernorm import RMSNorm
from lmprog.runtime.layers.linear import linear, uninitialized
from lmprog.runtime.layers.logits_processor import LogitsProcessor, TiedLMHead
from lmprog.runtime.layers.rotary import RopeRows, RotaryEmbedding, rope_parameters
from lmprog.runtime.layers.vocab_parallel import VocabParallelEmbedding
from lmprog.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode
from lmprog.runtime.model_loader.safetensors_io import Shard
from lmprog.runtime.models.llama_shards import VOCAB_WEIGHTS, LlamaShards
from lmprog.runtime.models.weight_loading import Target, expected_keys, load_named_weights

logger = logging.getLogger(__name__)

# (our fused parameter, HF's parameter, shard id): HF name `...q_proj.weight` loads into rows
# `shard_slices["qkv_proj"]["q"]` of `...qkv_proj.weight`.
STACKED_PARAMS: tuple[tuple[str, str, str], ...] = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", "gate"),
    ("gate_up_proj", "up_proj", "up"),
)


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _kv_heads(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_id: int, dtype: torch.dtype) -> None:
        super().__init__()
        model_type = getattr(config, "model_type", "llama")
        bias = bool(getattr(config, "attention_bias", False))
        self.tp = current_tp()
        heads, kv_heads = config.num_attention_heads, _kv_heads(config)
        split = split_attention(heads, kv_heads, self.tp.rank, self.tp.size)
        self.num_heads = split.heads  # this rank's
        self.num_kv_heads = split.kv_heads
        self.head_dim = _head_dim(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        qkv_bias = bias or model_type == "qwen2"
        self.qkv_proj = linear(config.hidden_size, self.q_size + 2 * self.kv_size, qkv_bias, dtype)
        # Row-parallel: rank 0 alone adds the bias (after the all-reduce it is added once).
        self.o_proj = linear(self.q_size, config.hidden_size, bias and self.tp.rank == 0, dtype)
        self.qk_norm = model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
        self.attn = RadixAttention(layer_id, self.num_heads, self.head_dim, self.num_kv_heads)

    def forward(self, hidden: torch.Tensor, rope: RopeRows, fb: ForwardBatch) -> torch.Tensor:
        return self.tp.all_reduce(self.o_proj(self._attend(hidden, rope, fb)))

    def _attend(self, hidden: torch.Tensor, rope: RopeRows, fb: ForwardBatch) -> torch.Tensor:
        """[T, hidden] -> [T, heads * head_dim]: this rank's heads attended (before o_proj);
        writes their K/V to the pool."""
        t, h, hkv, d = hidden.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(hidden)  # [T, (H + 2 Hkv) * D]: q heads, then k heads, then v heads
        v = qkv[:, self.q_size + self.kv_size :].view(t, hkv, d)
        if self.qk_norm:
            q = self.q_norm(qkv[:, : self.q_size].view(t, h, d))
            k = self.k_norm(qkv[:, self.q_size : self.q_size + self.kv_size].view(t, hkv, d))
            q = RotaryEmbedding.apply(q, rope.cos, rope.sin)
            k = RotaryEmbedding.apply(k, rope.cos, rope.sin)
            return self.attn(q, k, v, fb)
        fused = self._fused_rope_store(qkv, rope, fb)
        if fused is not None:
            q, k = fused
            return self.attn(q, k, v, fb, save_kv_cache=False)
        # q and k heads are adjacent in each row: rotate them in one pass.
        qk = RotaryEmbedding.apply(
            qkv[:, : self.q_size + self.kv_size].view(t, h + hkv, d), rope.cos, rope.sin
        )
        return self.attn(qk[:, :h], qk[:, h:], v, fb)

    def _fused_rope_store(
        self, qkv: torch.Tensor, rope: RopeRows, fb: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rotated (q, k) with k and v already written to the pool by the kernels' fused op
        (sgl_kernel on CPU, sgl_kernel_cuda on GPUs); None where the op does not apply (no
        kernels, encode mode, a pool in another dtype)."""
        kernels = kernels_for(qkv)
        pool = fb.token_to_kv_pool
        if kernels is None or pool is None or fb.forward_mode is ForwardMode.ENCODE:
            return None
        k_buf, v_buf = pool.get_kv_buffer(self.attn.layer_id)
        if k_buf.dtype != qkv.dtype:
            return None
        return kernels.rope_kv_store(
            qkv,
            rope.cos32,
            rope.sin32,
            fb.out_cache_loc,
            k_buf,
            v_buf,
            self.num_heads,
            self.num_kv_heads,
        )


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {config.hidden_act!r} (only silu)")
        bias = bool(getattr(config, "mlp_bias", False))
        self.tp = current_tp()
        start, stop = split_evenly(
            config.intermediate_size, self.tp.rank, self.tp.size, "intermediate_size"
        )
        hidden, inter = config.hidden_size, stop - start  # this rank's columns
        self.gate_up_proj = linear(hidden, 2 * inter, bias, dtype)
        self.down_proj = linear(inter, hidden, bias and self.tp.rank == 0, dtype)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(self.act_fn(self.gate_up_proj(x))))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(config, layer_id, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(config, dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeRows,
        fb: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sublayer output, residual stream) -> the same after this layer (residual not yet added).

        On the first layer `residual` is None and `hidden` is the embedding, which becomes it.
        """
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rope, fb)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.tp = current_tp()
        self.embed_tokens = uninitialized(
            VocabParallelEmbedding, config.vocab_size, config.hidden_size, dtype=dtype
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, dtype) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(
            _head_dim(config), config.max_position_embeddings, rope_parameters(config)
        )
        self._stack: tuple[DecodeStack | None] | None = None  # built on the first forward

    def decode_stack(self) -> DecodeStack | None:
        """The C++ stack of these layers for decode steps (layers/decode_stack.py), built once
        on first use, after loading and quantization; None where it does not apply."""
        if self._stack is None:
            # The stack runs whole layers in C++: it has no place for a rank's all-reduces.
            usable = stack_enabled() and not self.tp.is_sharded
            self._stack = (DecodeStack.build(self) if usable else None,)
        return self._stack[0]

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        """[T] token ids -> [T, hidden] final-normed hidden states; writes every layer's KV."""
        self.rotary_emb.ensure(max(fb.seq_lens_cpu))
        hidden = self.embed_tokens(fb.input_ids)
        rope = self.rotary_emb.rows(fb.positions, hidden.dtype)
        stack = self.decode_stack() if fb.forward_mode.is_decode else None
        if stack is not None and stack.applies(hidden, fb):
            return stack.forward(hidden, rope, fb)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, rope, fb)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """`forward(forward_batch)` -> float32 logits [rows, vocab], rows per `logits_indices`.

    Invariants: the step's attention backend is set on the ForwardBatch and its
    `init_forward_metadata` has run; `req_to_token` already maps every new token's position to
    its `out_cache_loc` slot (extend reads the new tokens' KV back through it). `dtype`
    defaults to float32 (bf16 matmuls are ~100x slower on CPUs without AMX).
    """

    def __init__(self, config: Any, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dtype = dtype or torch.float32
        self.config = config
        self.tp = current_tp()
        self.shards = LlamaShards(config, self.tp)
        self.num_layers: int = config.num_hidden_layers
        self.num_kv_heads: int = rank_kv_heads(config, self.tp)
        self.head_dim: int = _head_dim(config)
        self.max_context_len: int = config.max_position_embeddings
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.model = LlamaModel(config, dtype)
        if self.tie_word_embeddings:
            self.lm_head: nn.Module = TiedLMHead(self.model.embed_tokens)
        else:
            rows = self.model.embed_tokens.num_embeddings  # this rank's (padded) vocabulary
            self.lm_head = linear(config.hidden_size, rows, False, dtype)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.requires_grad_(False)
        self._warn_sliding_window(config)

    def forward(self, forward_batch: ForwardBatch) -> torch.Tensor:
        hidden = self.model(forward_batch)
        return self.logits_processor(hidden, self.lm_head, forward_batch)

    def checkpoint_shard(self, name: str) -> Shard | None:
        """The slice of checkpoint tensor `name` this rank loads (None: all of it)."""
        return self.shards.source(name)

    def checkpoint_names(self, module: str) -> list[str]:
        """The HF weights whose rows, in order, make up linear layer `module`'s weight
        ('model.layers.0.self_attn.qkv_proj' -> its q_proj, k_proj, v_proj weights)."""
        if module == "lm_head":
            return ["model.embed_tokens.weight" if self.tie_word_embeddings else "lm_head.weight"]
        parent, _, leaf = module.rpartition(".")
        parts = [theirs for fused, theirs, _ in STACKED_PARAMS if fused == leaf]
        return [f"{parent}.{part}.weight" for part in parts or [leaf]]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies HF-named weights in; fails on an unknown name, a wrong shape or a missing one."""
        skip = ("lm_head.weight",) if self.tie_word_embeddings else ()
        load_llama_weights(self, weights, skip)

    @staticmethod
    def _warn_sliding_window(config: Any) -> None:
        window = getattr(config, "sliding_window", None)
        active = getattr(config, "use_sliding_window", config.model_type == "mistral")
        if window and active and window < config.max_position_embeddings:
            logger.warning(
                "config declares a sliding window of %d tokens; lmprog attends to the full "
                "context, so outputs differ from the reference beyond %d tokens",
                window,
                window,
            )


def rank_kv_heads(config: Any, tp: TpGroup) -> int:
    """The KV heads one rank of `tp` holds (all of them on one rank)."""
    return split_attention(config.num_attention_heads, _kv_heads(config), tp.rank, tp.size).kv_heads


def load_llama_weights(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], skip: tuple[str, ...] = ()
) -> None:
    """Loads HF Llama-family weights into `model`, whose body is `model.model` (a LlamaModel)
    and whose other parameters are named as HF's (`lm_head`, a classifier's `score`); the
    names in `skip` are not used. Fails on an unknown name, a wrong shape or a missing one.
    Under tensor parallelism the tensors are the rank's slices (`model.shards.source`)."""
    config = model.config
    shards: LlamaShards = model.shards

    def target(name: str) -> Target | None:
        """HF name -> (our parameter, its rows, key in the loaded set); None: not used here."""
        if "rotary_emb." in name or name in skip or shards.held_elsewhere(name):
            return None  # recomputed buffers; a tied head is the embedding
        for fused, theirs, shard in STACKED_PARAMS:
            if f".{theirs}." in name:
                target = name.replace(f".{theirs}.", f".{fused}.")
                return target, shards.fused_rows(shard), f"{target}[{shard}]"
        if name in VOCAB_WEIGHTS:
            return name, shards.vocab_target_rows(), name
        return name, slice(None), name

    fused_ids: dict[str, list[str]] = {}
    for fused, _, shard in STACKED_PARAMS:
        fused_ids.setdefault(fused, []).append(shard)
    family = getattr(config, "model_type", "?")
    load_named_weights(model, weights, target, expected_keys(model, fused_ids), family)
