"""Read a llama.cpp GGUF file as an HF config plus HF-named, dequantized weights.

What is cached (see cache.py), and why:
  - the config (configs/<key>.json): building it needs `gguf.GGUFReader`, which spends ~4-6 s
    parsing the 49k-entry tokenizer arrays of the metadata even though the config needs none;
  - the weights (weights/<key>-<dtype>.safetensors): dequantizing Q4_1 costs ~2 s for 135M
    parameters, plus the reader; a cached load is a memory-mapped read;
  - the quantized tensors' raw blocks (weights/<key>-blocks.safetensors, uint8 rows, their ggml
    types in the header's metadata) for `--quantization gguf`, which computes from the blocks.
On a warm cache the GGUF file is only hashed, never parsed.

Supported llama.cpp architectures are listed in `GGUF_ARCHS`; each maps onto an HF architecture
whose parameter names follow the Llama layout (Llama, Qwen2, Qwen3). Adding another with that
layout is one table entry (plus any extra per-block tensors in `_BLOCK_TENSORS`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from lmprog.runtime.model_loader.cache import atomic_write_text, cache_dir, file_key
from lmprog.runtime.model_loader.safetensors_io import (
    ShardOf,
    is_readable,
    read_metadata,
    read_tensors,
    take_shard,
    write_through,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFArch:
    model_type: str  # HF config model_type
    architecture: str  # HF model class, for config.architectures
    # llama.cpp's convert_hf_to_gguf.py permutes Q/K rows for these archs (see `unpermute_qk`).
    permute_qk: bool


GGUF_ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", "LlamaForCausalLM", permute_qk=True),
    "qwen2": GGUFArch("qwen2", "Qwen2ForCausalLM", permute_qk=False),
    "qwen3": GGUFArch("qwen3", "Qwen3ForCausalLM", permute_qk=False),
}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class GGUFBlocks:
    """One quantized weight as the file stores it: `raw` uint8 [rows, bytes per row], each row
    its K / block_size blocks of ggml type `qtype` (ggml's GGMLQuantizationType value), rows in
    HF's order (llama.cpp's Q/K permutation undone: blocks run along K, so rows move whole)."""

    qtype: int
    raw: torch.Tensor
    shape: tuple[int, int]  # (N, K) of the weight it encodes


class GGUFCheckpoint:
    """One GGUF file; the file is parsed only when a cache entry is missing."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.key = file_key(path)

    @cached_property
    def reader(self) -> GGUFReader:
        logger.info("parsing %s (one-time; results are cached under %s)", self.path, cache_dir())
        return GGUFReader(self.path)

    def config(self) -> PretrainedConfig:
        """The HF config, from configs/<key>.json or built from the metadata and cached."""
        cached = cache_dir() / "configs" / f"{self.key}.json"
        try:
            return _config_from_dict(json.loads(cached.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError):
            pass  # missing or unreadable: (re)build it
        config = config_from_gguf(self.reader)
        atomic_write_text(cached, config.to_json_string(use_diff=False))
        return config

    def weights(
        self, dtype: torch.dtype, shard_of: ShardOf | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named tensors in `dtype`: from the cache, or dequantized while filling the cache
        (the whole tensors: the cache is shared by every rank). `shard_of` as read_tensors."""
        dtype_name = str(dtype).removeprefix("torch.")
        cached = cache_dir() / "weights" / f"{self.key}-{dtype_name}.safetensors"
        if cached.exists() and is_readable(cached):
            yield from read_tensors(cached, shard_of)
            return
        if shard_of is not None:
            for name, tensor in self.weights(dtype):
                yield name, take_shard(tensor, shard_of(name))
            return
        logger.info("dequantizing %s to %s (cached at %s)", self.path, dtype, cached)
        config = self.config()
        specs = [(hf_tensor_name(t.name), _torch_shape(t)) for t in self.reader.tensors]
        tensors = dequantized_tensors(self.reader, config, dtype)
        yield from write_through(cached, specs, dtype, tensors)

    def blocks(self) -> dict[str, GGUFBlocks]:
        """Every quantized tensor (not F32/F16/BF16) as raw blocks, by HF name: from the cache,
        or read from the file while filling the cache."""
        cached = cache_dir() / "weights" / f"{self.key}-blocks.safetensors"
        if cached.exists() and is_readable(cached):
            return _blocks_from(read_tensors(cached), read_metadata(cached))
        config = self.config()
        arch = _arch(_Metadata(self.reader).require("general.architecture"))
        quantized = [t for t in self.reader.tensors if t.tensor_type not in _FLOAT_TYPES]
        specs = [(hf_tensor_name(t.name), tuple(t.data.shape)) for t in quantized]
        meta = {hf_tensor_name(t.name): _block_meta(t) for t in quantized}

        def rows() -> Iterator[tuple[str, torch.Tensor]]:
            for t in quantized:
                raw = torch.from_numpy(np.array(t.data, dtype=np.uint8))
                if arch.permute_qk and ".attn_q." in t.name:
                    raw = unpermute_qk(raw, config.num_attention_heads)
                elif arch.permute_qk and ".attn_k." in t.name:
                    raw = unpermute_qk(raw, config.num_key_value_heads)
                yield hf_tensor_name(t.name), raw.contiguous()

        stream = write_through(cached, specs, torch.uint8, rows(), metadata=meta)
        return _blocks_from(stream, meta)


_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def _block_meta(t: ReaderTensor) -> str:
    """'qtype,N,K' for the cache header."""
    n, k = _torch_shape(t)
    return f"{int(t.tensor_type)},{n},{k}"


def _blocks_from(
    tensors: Iterator[tuple[str, torch.Tensor]], meta: dict[str, str]
) -> dict[str, GGUFBlocks]:
    out = {}
    for name, raw in tensors:
        qtype, n, k = (int(v) for v in meta[name].split(","))
        out[name] = GGUFBlocks(qtype, raw, (n, k))
    return out


def config_from_gguf(reader: GGUFReader) -> PretrainedConfig:
    """An HF config (LlamaConfig, Qwen2Config, ...) from the GGUF metadata."""
    from transformers import AutoConfig

    meta = _Metadata(reader)
    arch_name = meta.require("general.architecture")
    arch = _arch(arch_name)
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(
            f"{reader.data.filename}: stores rope frequency factors (Llama 3.1-style rope "
            "scaling) as a tensor, which this loader does not convert; use the HF folder instead"
        )

    def key(name: str) -> str:
        return f"{arch_name}.{name}"

    hidden = meta.require(key("embedding_length"))
    n_heads = meta.require(key("attention.head_count"))
    kwargs: dict[str, Any] = {
        "architectures": [arch.architecture],
        "vocab_size": _vocab_size(meta, reader, arch_name),
        "hidden_size": hidden,
        "intermediate_size": meta.require(key("feed_forward_length")),
        "num_hidden_layers": meta.require(key("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta.get(key("attention.head_count_kv"), n_heads),
        "head_dim": meta.get(key("attention.key_length"), hidden // n_heads),
        "max_position_embeddings": meta.require(key("context_length")),
        "rms_norm_eps": meta.require(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": meta.get(key("rope.freq_base"), 10000.0),
        "rope_scaling": _rope_scaling(meta, arch_name),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if arch.model_type == "llama":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    return AutoConfig.for_model(arch.model_type, **kwargs)


def dequantized_tensors(
    reader: GGUFReader, config: PretrainedConfig, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor in `dtype`) for every tensor, in file order.

    Each tensor is dequantized to float32 (numpy, by `gguf.quants.dequantize`), has llama.cpp's
    Q/K permutation undone where the arch needs it, and is then cast to `dtype`.
    """
    arch = _arch(_Metadata(reader).require("general.architecture"))
    for t in reader.tensors:
        array = dequantize(t.data, t.tensor_type)
        shape = _torch_shape(t)
        assert array.shape == shape, f"{t.name}: dequantized to {array.shape}, expected {shape}"
        weight = torch.from_numpy(array if array.flags.writeable else np.array(array))
        weight = weight.to(torch.float32)
        if arch.permute_qk and ".attn_q." in t.name:
            weight = unpermute_qk(weight, config.num_attention_heads)
        elif arch.permute_qk and ".attn_k." in t.name:
            weight = unpermute_qk(weight, config.num_key_value_heads)
        yield hf_tensor_name(t.name), weight.to(dtype).contiguous()


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation, giving HF's rotate-half row order.

    Within each head of `head_dim` rows, HF rotates row i together with row i + head_dim/2;
    ggml's rope rotates adjacent rows 2i and 2i+1, so the converter interleaves the two halves:

        HF rows:   x0 x1 x2 ... | y0 y1 y2 ...       (x_i pairs with y_i)
        GGUF rows: x0 y0 x1 y1 x2 y2 ...

    Reading GGUF rows as [head, i, (x|y)] and swapping the last two axes restores HF's order.
    Works for weights [rows, in] and biases [rows].
    """
    rows = weight.shape[0]
    assert rows % (2 * n_heads) == 0, f"{rows} rows do not split into {n_heads} heads of pairs"
    return (
        weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def hf_tensor_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight', and so on."""
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        if part in _BLOCK_TENSORS:
            return f"model.layers.{layer}.{_BLOCK_TENSORS[part]}.{suffix}"
    elif base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no HF equivalent known to this loader")


class _Metadata:
    """Typed access to a GGUF's key-value metadata."""

    def __init__(self, reader: GGUFReader) -> None:
        self.fields = reader.fields
        self.filename = str(reader.data.filename)

    def get(self, name: str, default: Any = None) -> Any:
        field = self.fields.get(name)
        return default if field is None else field.contents()

    def require(self, name: str) -> Any:
        value = self.get(name)
        if value is None:
            raise ValueError(f"{self.filename}: GGUF metadata lacks {name!r}")
        return value


def _arch(name: str) -> GGUFArch:
    if name not in GGUF_ARCHS:
        raise ValueError(
            f"GGUF architecture {name!r} is not supported; supported: {', '.join(GGUF_ARCHS)}"
        )
    return GGUF_ARCHS[name]


def _vocab_size(meta: _Metadata, reader: GGUFReader, arch_name: str) -> int:
    size = meta.get(f"{arch_name}.vocab_size")
    if size is not None:
        return size
    tokens = meta.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)
    return next(_torch_shape(t)[0] for t in reader.tensors if t.name == "token_embd.weight")


def _rope_scaling(meta: _Metadata, arch_name: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch_name}.rope.scaling.type", "none")
    factor = meta.get(f"{arch_name}.rope.scaling.factor")
    if kind == "none" or factor in (None, 0.0, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = meta.require(f"{arch_name}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise ValueError(f"{meta.filename}: rope scaling type {kind!r} is not supported")


def _torch_shape(t: ReaderTensor) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-varying first (ggml's ne); torch lists them slowest first.
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def _config_from_dict(d: dict[str, Any]) -> PretrainedConfig:
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[d["model_type"]].from_dict(d)
