"""Stream tensors to and from .safetensors files, one tensor in memory at a time.

`write_through` lets a converter (the GGUF dequantizer) fill the weights cache while the model
consumes the same tensors: the header is written first from the known names and shapes, then each
tensor's bytes as it passes. Peak memory stays at one tensor beyond the model itself, instead of a
second full copy of the weights (what `safetensors.torch.save_file` would need).

File format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}} padded
with spaces to a multiple of 8 bytes, then the tensors' bytes back to back in header order.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
import sys
from collections.abc import Callable, Iterable, Iterator

import torch
from safetensors import safe_open

from lmprog.runtime.model_loader.cache import temp_path_beside

# The dtypes a model can be loaded in, with their safetensors names.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
}

# Every dtype these files hold: the loadable ones, plus raw bytes (GGUF's quantized blocks).
STORED_DTYPES: dict[torch.dtype, str] = {**SAFETENSORS_DTYPES, torch.uint8: "U8"}

TensorSpec = tuple[str, tuple[int, ...]]  # (name, shape)


# The part of a checkpoint tensor one tensor-parallel rank reads: (dim, start, stop).
Shard = tuple[int, int, int]
ShardOf = Callable[[str], "Shard | None"]


def read_tensors(
    path: str | os.PathLike[str], shard_of: ShardOf | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from a .safetensors file in file order (memory-mapped reads).

    `shard_of(name)`, when given, names the slice of each tensor to read (None: all of it):
    only that slice's bytes are read, so a rank never holds another rank's weights."""
    with safe_open(str(path), framework="pt") as f:
        names = f.offset_keys() if hasattr(f, "offset_keys") else f.keys()
        for name in names:
            shard = shard_of(name) if shard_of is not None else None
            if shard is None:
                yield name, f.get_tensor(name)
                continue
            dim, start, stop = shard
            index = (slice(None),) * dim + (slice(start, stop),)
            yield name, f.get_slice(name)[index]


def take_shard(tensor: torch.Tensor, shard: Shard | None) -> torch.Tensor:
    """`tensor`'s slice `shard` (for sources read whole: .bin files, a first GGUF conversion)."""
    if shard is None:
        return tensor
    dim, start, stop = shard
    return tensor.narrow(dim, start, stop - start)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The file's `__metadata__` (string to string; empty when it has none)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def is_readable(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a well-formed .safetensors file (the header parses, sizes agree)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
        return True
    except Exception:  # noqa: BLE001 - any parse failure means "rebuild this cache entry"
        return False


def write_through(
    final: pathlib.Path,
    specs: list[TensorSpec],
    dtype: torch.dtype,
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `tensors` unchanged while writing them to `final`, which appears only when complete.

    `specs` lists every tensor's name and shape in the order `tensors` produces them; each tensor
    is checked against it. `metadata` goes into the header's `__metadata__`. If the consumer
    stops early or anything raises, the temporary file is removed and `final` is left untouched.
    """
    assert sys.byteorder == "little", "safetensors stores little-endian data"
    header = _header(specs, dtype, metadata or {})
    tmp = temp_path_beside(final)
    published = False
    try:
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            count = 0
            for name, tensor in tensors:
                _check(count, specs, name, tensor, dtype)
                out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                count += 1
                yield name, tensor
            assert count == len(specs), f"got {count} tensors; the header lists {len(specs)}"
        os.replace(tmp, final)
        published = True
    finally:
        if not published:
            tmp.unlink(missing_ok=True)


def _header(specs: list[TensorSpec], dtype: torch.dtype, metadata: dict[str, str]) -> bytes:
    itemsize = torch.empty((), dtype=dtype).element_size()
    entries: dict[str, object] = {"__metadata__": {"format": "pt", **metadata}}
    offset = 0
    for name, shape in specs:
        nbytes = itemsize * _numel(shape)
        entries[name] = {
            "dtype": STORED_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 8)


def _check(i: int, specs: list[TensorSpec], name: str, tensor: torch.Tensor, dtype: torch.dtype):
    assert i < len(specs), f"tensor {name!r} is beyond the {len(specs)} the header lists"
    want_name, want_shape = specs[i]
    assert (name, tuple(tensor.shape), tensor.dtype) == (want_name, want_shape, dtype), (
        f"tensor {i} is {name!r} {tuple(tensor.shape)} {tensor.dtype}; "
        f"the header says {want_name!r} {want_shape} {dtype}"
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
