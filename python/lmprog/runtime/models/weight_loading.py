"""Copying HF-named checkpoint weights into a model, with the checks every model wants.

A model maps each checkpoint name to a target: (our parameter, the rows of it the tensor
fills, the key recorded as loaded) or None for a weight it does not use. Fused parameters
(one qkv matmul filled from HF's separate q/k/v) record one key per shard, so a missing shard
is reported by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

Target = tuple[str, slice, str]


@torch.no_grad()
def load_named_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    target_of: Callable[[str], Target | None],
    expected: set[str],
    family: str,
) -> None:
    """Copies each weight to its target; fails on an unknown name, a wrong shape, or any
    `expected` key left unloaded."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        found = target_of(name)
        if found is None:
            continue
        target, rows, key = found
        if target not in params:
            raise ValueError(f"unexpected weight {name!r} for {type(model).__name__} ({family})")
        dst = params[target].data[rows]
        if dst.shape != tensor.shape:
            raise ValueError(
                f"weight {name!r} has shape {tuple(tensor.shape)}; "
                f"the model expects {tuple(dst.shape)}"
            )
        dst.copy_(tensor)
        loaded.add(key)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"{len(missing)} weights missing from the checkpoint: {missing[:8]}")


def expected_keys(model: nn.Module, shards: dict[str, Iterable[str]]) -> set[str]:
    """Every parameter's key; a fused one (`shards`: its name part -> shard ids) one per shard."""
    keys: set[str] = set()
    for name, _ in model.named_parameters():
        fused = next((ids for part, ids in shards.items() if f".{part}." in name), None)
        if fused is None:
            keys.add(name)
        else:
            keys.update(f"{name}[{shard}]" for shard in fused)
    return keys
