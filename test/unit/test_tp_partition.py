"""How a model splits over tensor-parallel ranks: heads, vocabulary rows, checkpoint slices."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lmprog.runtime.distributed.parallel_state import TpGroup
from lmprog.runtime.distributed.partition import split_attention, vocab_rows
from lmprog.runtime.model_loader.safetensors_io import read_tensors
from lmprog.runtime.models.llama_shards import LlamaShards


def test_kv_heads_split_or_replicate() -> None:
    # 8 query heads over 4 ranks: 2 each; 2 KV heads are shared by ranks (0, 1) and (2, 3).
    splits = [split_attention(8, 2, r, 4) for r in range(4)]
    assert [(s.heads, s.head_start) for s in splits] == [(2, 0), (2, 2), (2, 4), (2, 6)]
    assert [(s.kv_heads, s.kv_head_start) for s in splits] == [(1, 0), (1, 0), (1, 1), (1, 1)]
    # Every query head still meets the KV head it uses in the whole model (group of 4).
    for s in splits:
        assert all(h // 4 == s.kv_head_start for h in range(s.head_start, s.head_start + s.heads))
    assert (
        split_attention(8, 4, 1, 2).kv_heads == 2 and split_attention(8, 4, 1, 2).kv_head_start == 2
    )


@pytest.mark.parametrize(
    ("heads", "kv", "size", "message"),
    [
        (9, 3, 2, "9 query heads and 3 KV heads"),
        (8, 6, 4, "must divide the model's 6 KV heads"),
        (8, 3, 4, "must be a multiple of the model's 3 KV heads"),
    ],
)
def test_splits_that_cannot_work_are_refused(heads: int, kv: int, size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_attention(heads, kv, 0, size)


def test_vocab_rows_pad_the_last_rank() -> None:
    assert [vocab_rows(161, r, 2) for r in range(2)] == [(0, 81, 81), (81, 161, 81)]
    assert vocab_rows(160, 1, 2) == (80, 160, 80)


def test_a_rank_reads_only_its_slices(tmp_path) -> None:
    """The checkpoint slices rank 1 of 2 asks for, read from a file, are its rows/columns."""
    config = type("C", (), {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 8,
                            "intermediate_size": 6, "vocab_size": 5})()  # fmt: skip
    shards = LlamaShards(config, TpGroup(rank=1, size=2))
    whole = {
        "model.layers.0.self_attn.q_proj.weight": torch.arange(64.0).view(8, 8),
        "model.layers.0.self_attn.k_proj.weight": torch.arange(32.0).view(4, 8),
        "model.layers.0.self_attn.o_proj.weight": torch.arange(64.0).view(8, 8),
        "model.layers.0.self_attn.o_proj.bias": torch.arange(8.0),
        "model.layers.0.mlp.down_proj.weight": torch.arange(48.0).view(8, 6),
        "model.embed_tokens.weight": torch.arange(40.0).view(5, 8),
        "model.norm.weight": torch.ones(8),
    }
    path = tmp_path / "w.safetensors"
    save_file(whole, str(path))
    got = dict(read_tensors(path, shards.source))
    n = "model.layers.0."
    assert torch.equal(got[n + "self_attn.q_proj.weight"], whole[n + "self_attn.q_proj.weight"][4:])
    assert torch.equal(got[n + "self_attn.k_proj.weight"], whole[n + "self_attn.k_proj.weight"][2:])
    assert torch.equal(
        got[n + "self_attn.o_proj.weight"], whole[n + "self_attn.o_proj.weight"][:, 4:]
    )
    assert torch.equal(got[n + "mlp.down_proj.weight"], whole[n + "mlp.down_proj.weight"][:, 3:])
    assert torch.equal(got["model.embed_tokens.weight"], whole["model.embed_tokens.weight"][3:])
    assert torch.equal(got["model.norm.weight"], whole["model.norm.weight"])
    assert shards.held_elsewhere(n + "self_attn.o_proj.bias")  # rank 0 adds it
