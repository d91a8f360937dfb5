"""Tiny random-weight causal LMs for tensor-parallel tests, saved as HF folders.

Every one has 8 query heads, so 2 ranks split them, with 1, 2 or 4 KV heads (1 is replicated
on both ranks). Weights are randomized wholesale (norms, biases too), so a shard loaded into the
wrong rows, or a bias added twice, changes the logits. The folders get the synthetic word-level
tokenizer of `write_dummy_model_folder` (token i is spelled `<i>`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers

from lmprog.runtime.model_loader.dummy_folder import write_dummy_model_folder

_BASE = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "max_position_embeddings": 256,
}


def _configs() -> dict[str, transformers.PretrainedConfig]:
    t = transformers
    return {
        # An odd vocabulary: the second rank's shard ends in a padding row.
        "llama_kv1": t.LlamaConfig(**_BASE, vocab_size=161, num_key_value_heads=1),
        "llama_kv2_bias": t.LlamaConfig(
            **_BASE, vocab_size=160, num_key_value_heads=2, attention_bias=True, mlp_bias=True
        ),
        "mistral_kv4": t.MistralConfig(**_BASE, vocab_size=160, num_key_value_heads=4, head_dim=16),
        "qwen2_kv2": t.Qwen2Config(**_BASE, vocab_size=163, num_key_value_heads=2),
        "qwen3_kv4_tied": t.Qwen3Config(
            **_BASE, vocab_size=161, num_key_value_heads=4, head_dim=24, tie_word_embeddings=True
        ),
    }


TP_CONFIGS = list(_configs())


@functools.cache
def save_tp_model(name: str, root: str) -> Path:
    """Writes model `name` (one of TP_CONFIGS) under `root`; returns its folder."""
    config = _configs()[name]
    folder = write_dummy_model_folder(Path(root) / name, config)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if "norm" in param_name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(folder)
    return folder


def words(ids: list[int]) -> str:
    """The prompt text of token ids under the synthetic tokenizer."""
    return " ".join(f"<{i}>" for i in ids)
