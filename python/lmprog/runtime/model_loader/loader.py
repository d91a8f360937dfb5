"""`load_model`: a model spec to (HF config, fast tokenizer, lazily streamed weights)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmprog.runtime.model_loader.folder_loader import folder_weights
from lmprog.runtime.model_loader.gguf_loader import GGUFBlocks, GGUFCheckpoint
from lmprog.runtime.model_loader.resolve import ModelSource, resolve_model
from lmprog.runtime.model_loader.safetensors_io import SAFETENSORS_DTYPES, ShardOf
from lmprog.runtime.model_loader.tokenizer_cache import load_tokenizer

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

WeightStream = Iterator[tuple[str, torch.Tensor]]


@dataclass
class LoadedModel:
    """A resolved model: config and tokenizer in memory, weights read when `weights()` runs."""

    source: ModelSource
    config: PretrainedConfig  # LlamaConfig for a GGUF; AutoConfig's class for a folder
    tokenizer: PreTrainedTokenizerBase  # fast; chat_template set when the model has one
    dtype: torch.dtype  # the dtype `weights()` yields floating tensors in
    _stream: Callable[[ShardOf | None], WeightStream] = field(repr=False)
    _blocks: Callable[[], dict[str, GGUFBlocks]] | None = field(default=None, repr=False)

    def weights(self, shard_of: ShardOf | None = None) -> WeightStream:
        """Yield (HF parameter name, tensor) pairs, one tensor in memory at a time.

        Names are HF's ("model.layers.0.self_attn.q_proj.weight"); "lm_head.weight" appears only
        when the checkpoint stores it (untied embeddings). Each call starts a fresh stream.
        `shard_of(name)` -> (dim, start, stop) or None: read only that slice of each tensor
        (a tensor-parallel rank's share).
        """
        return self._stream(shard_of)

    def gguf_blocks(self) -> dict[str, GGUFBlocks]:
        """A .gguf model's quantized tensors as their raw blocks, by HF name."""
        if self._blocks is None:
            raise ValueError(f"{self.source.path} is not a .gguf file: it has no quantized blocks")
        return self._blocks()


def load_model(spec: str, dtype: torch.dtype) -> LoadedModel:
    """Resolve `spec` (alias, .gguf path, HF folder, hub id) and load its config and tokenizer."""
    if dtype not in SAFETENSORS_DTYPES:
        supported = ", ".join(str(d) for d in SAFETENSORS_DTYPES)
        raise ValueError(f"cannot load weights as {dtype}; supported dtypes: {supported}")
    source = resolve_model(spec)
    if source.kind == "gguf":
        checkpoint = GGUFCheckpoint(source.path)
        config = checkpoint.config()

        def stream(shard_of: ShardOf | None) -> WeightStream:
            return checkpoint.weights(dtype, shard_of)

        blocks = checkpoint.blocks
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source.path)

        def stream(shard_of: ShardOf | None) -> WeightStream:
            return folder_weights(source.path, dtype, shard_of)

        blocks = None
    return LoadedModel(source, config, load_tokenizer(source), dtype, stream, blocks)
