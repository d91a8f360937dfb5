"""Tiny random-weight pooling models, saved as HF folders (no hub on these machines): the HF
transformers model each folder was saved from is the reference lmprog's outputs are compared
with. Llama-family models get SmolLM2's tokenizer, BERT ones all-MiniLM-L6-v2's (both installed
packages)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import transformers

PAD = 2  # the classifiers' pad_token_id: HF classifies from the last token that is not it

_DECODER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": PAD,
}
_BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
_CONFIGS = {
    "Llama": transformers.LlamaConfig,
    "Mistral": transformers.MistralConfig,
    "Qwen2": transformers.Qwen2Config,
    "Qwen3": transformers.Qwen3Config,
    "Bert": transformers.BertConfig,
}


@functools.cache
def tokenizer(family: str) -> Any:
    from lmprog.runtime.model_loader import load_tokenizer, resolve_model

    alias = "all-minilm-l6-v2" if family == "Bert" else "smollm2-135m-instruct"
    return load_tokenizer(resolve_model(alias))


def save_tiny(path: Path, architecture: str, labels: list[str], seed: int = 0) -> Any:
    """Saves a tiny `architecture` (e.g. "Qwen2ForSequenceClassification") with these labels
    and random weights to `path` (with its tokenizer); returns the HF model, in eval mode.

    Weights are drawn wider than HF's init (and norms and biases randomized), so that logits
    differ clearly between inputs and a misplaced weight shows."""
    family = architecture.split("For")[0]
    tok = tokenizer(family)
    config = _CONFIGS[family](
        vocab_size=len(tok),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        **(_BERT if family == "Bert" else _DECODER),
    )
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "LayerNorm.weight" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def hf_logits(model: Any, ids: list[int], token_type_ids: list[int] | None = None) -> torch.Tensor:
    """HF's logits for one unpadded sequence: [num_labels], or [tokens, num_labels]."""
    kwargs = {} if token_type_ids is None else {"token_type_ids": torch.tensor([token_type_ids])}
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), **kwargs).logits[0].float()
