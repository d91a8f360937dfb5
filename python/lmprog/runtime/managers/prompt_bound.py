"""A lower bound on a text's token count, known without tokenizing it.

Tokenizing 16 MiB of text takes about 20 s of a core here; a prompt that long can never fit a
model's context, so the server refuses it at once. The bound: no token covers more bytes of text
than the longest string in the vocabulary, so a text of C characters (at least C bytes) has at
least C / longest tokens. That holds for tokenizers without a normalizer (byte-level BPE, as
Llama 3, Qwen and SmolLM use); a normalizer may shrink text (collapse spaces), so with one there
is no bound (0).
"""

from __future__ import annotations

from typing import Any


class PromptBound:
    def __init__(self, tokenizer: Any) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.max_token_bytes: int | None = None
        if backend is not None and backend.normalizer is None:
            vocab = backend.get_vocab(with_added_tokens=True)
            self.max_token_bytes = max((len(t.encode()) for t in vocab), default=None)

    def at_least(self, text: str) -> int:
        """Tokens `text` has at least (0 when no bound is known)."""
        if not self.max_token_bytes:
            return 0
        return -(-len(text) // self.max_token_bytes)
