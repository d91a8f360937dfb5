"""Model classes by HF architecture name (`config.architectures`), imported lazily.

Each entry is "module:Class" so that importing the registry imports no model code; a model
module is loaded only when a checkpoint names one of its architectures.
"""

from __future__ import annotations

import importlib

_LLAMA = "lmprog.runtime.models.llama:LlamaForCausalLM"
_LLAMA_SEQ = "lmprog.runtime.models.llama_classification:LlamaForSequenceClassification"
_LLAMA_TOKEN = "lmprog.runtime.models.llama_classification:LlamaForTokenClassification"
_BERT_CLS = "lmprog.runtime.models.bert_classification"

# HF architecture name -> "module:Class". One implementation serves the whole Llama family;
# it reads the per-family switches (biases, q/k norm) from the config's model_type.
# Classifiers (`*For{Sequence,Token}Classification`) are pooling models whatever the runner.
_MODELS: dict[str, str] = {
    "BertModel": "lmprog.runtime.models.bert:BertModel",
    "BertForSequenceClassification": f"{_BERT_CLS}:BertForSequenceClassification",
    "BertForTokenClassification": f"{_BERT_CLS}:BertForTokenClassification",
    **{
        f"{family}{suffix}": cls
        for family in ("Llama", "Mistral", "Qwen2", "Qwen3")
        for suffix, cls in (
            ("ForCausalLM", _LLAMA),
            ("ForSequenceClassification", _LLAMA_SEQ),
            ("ForTokenClassification", _LLAMA_TOKEN),
        )
    },
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architectures: list[str]) -> type:
    """The class of the first supported name in `architectures` (a config's list, in order)."""
    for arch in architectures or []:
        if arch in _MODELS:
            module_name, cls_name = _MODELS[arch].split(":")
            return getattr(importlib.import_module(module_name), cls_name)
    raise ValueError(
        f"model architectures {architectures} are not supported; "
        f"supported: {supported_architectures()}"
    )
