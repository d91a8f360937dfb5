"""Load a model's fast tokenizer; GGUF tokenizers are converted once and cached on disk.

transformers can build a fast tokenizer from a GGUF's metadata (`from_pretrained(dir,
gguf_file=...)`) but takes ~7-10 s to do so, and both the API process and the scheduler need the
tokenizer at every start. So the converted tokenizer is saved with `save_pretrained` into
cache_dir()/tokenizers/<key> (<key>: the GGUF's content hash) and loaded from there, in ~0.2 s.
The first load also returns the tokenizer read back from the cache, so a first and a later start
behave identically. The chat template comes from the GGUF's `tokenizer.chat_template` metadata and
is saved with the tokenizer (chat_template.jinja).

Tokenizers are not shared between callers: each call returns a fresh object, since callers may
configure it (padding side, truncation).
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import TYPE_CHECKING

from lmprog.runtime.model_loader.cache import cache_dir, file_key, file_lock, publish_dir
from lmprog.runtime.model_loader.resolve import ModelSource

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The model's fast tokenizer, with its chat template when the model has one."""
    from transformers import AutoTokenizer

    if source.kind == "folder":
        return AutoTokenizer.from_pretrained(source.path)
    return AutoTokenizer.from_pretrained(str(cached_gguf_tokenizer_dir(source.path)))


def cached_gguf_tokenizer_dir(gguf_path: str) -> pathlib.Path:
    """The cache folder holding the GGUF's converted tokenizer, converting it on a miss."""
    folder = cache_dir() / "tokenizers" / file_key(gguf_path)
    if folder.is_dir():
        return folder
    # The lock keeps two processes starting together from both spending ~10 s converting.
    with file_lock(folder.with_name(folder.name + ".lock")):
        if not folder.is_dir():
            logger.info(
                "converting the tokenizer of %s (one-time, cached at %s)", gguf_path, folder
            )
            tokenizer = _convert(gguf_path)
            publish_dir(folder, tokenizer.save_pretrained)
    return folder


def _convert(gguf_path: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )
    if tokenizer.chat_template is None:
        # transformers copies tokenizer.chat_template from the metadata itself; this covers
        # versions that don't. Parsing the metadata costs seconds, so only when needed.
        from gguf import GGUFReader

        field = GGUFReader(gguf_path).fields.get("tokenizer.chat_template")
        if field is not None:
            tokenizer.chat_template = field.contents()
    return tokenizer
