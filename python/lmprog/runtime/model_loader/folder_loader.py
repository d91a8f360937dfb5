"""Stream the weights of an HF model folder (safetensors, or pytorch_model*.bin as a fallback).

Nothing is cached: safetensors files are memory-mapped and read one tensor at a time. Floating
tensors are cast to the requested dtype; integer buffers (BERT's `position_ids`) keep theirs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lmprog.runtime.model_loader.resolve import weight_files
from lmprog.runtime.model_loader.safetensors_io import ShardOf, read_tensors, take_shard


def folder_weights(
    folder: str, dtype: torch.dtype, shard_of: ShardOf | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) from every weight file of `folder`, floats cast to `dtype`;
    with `shard_of`, each tensor's slice it names (safetensors_io.read_tensors)."""
    files = weight_files(folder)
    if not files:
        raise ValueError(
            f"model folder {folder} has config.json but no weights (*.safetensors or "
            "pytorch_model*.bin); load_format='dummy' runs it with random weights"
        )
    for path in files:
        if path.endswith(".safetensors"):
            tensors = read_tensors(path, shard_of)
        else:
            tensors = ((n, take_shard(t, shard_of and shard_of(n))) for n, t in _read_bin(path))
        for name, tensor in tensors:
            yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def _read_bin(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    # weights_only refuses pickled code; mmap avoids reading the whole file up front.
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    yield from state.items()
