"""Per-sequence grammar state: which tokens may come next, and what the grammar forces.

A Matcher wraps one xgrammar GrammarMatcher. Before each sampling step `apply_masks` sets the
logits of disallowed tokens to -inf for every constrained row of the batch; after it, each
sequence's sampled token is accepted, advancing its state. When the grammar is complete only the
stop tokens stay allowed, so the sequence ends with EOS (or `terminated` ends it at once).

Jump-forward: where the grammar admits exactly one continuation (a JSON key, `": "`, a closing
brace), `forced_tokens` returns it as tokens to append without sampling each one.
"""

from __future__ import annotations

from typing import Any

import torch


class Matcher:
    def __init__(self, compiled: Any, tokenizer: Any) -> None:
        import xgrammar as xgr

        self._m = xgr.GrammarMatcher(compiled)
        self._compiled = compiled
        self._tokenizer = tokenizer

    def clone(self) -> Matcher:
        """A fresh matcher of the same grammar (for the sibling sequences of `n` > 1)."""
        return Matcher(self._compiled, self._tokenizer)

    def accept(self, token_id: int) -> bool:
        return bool(self._m.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        return bool(self._m.is_terminated())

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next (empty when there is a choice). Each is accepted; a
        tokenization the grammar would reject is cut where it fails."""
        text = self._m.find_jump_forward_string()
        if not text:
            return []
        accepted = []
        for token in self._tokenizer.encode(text, add_special_tokens=False):
            if not self._m.accept_token(token):
                break
            accepted.append(token)
        return accepted


def apply_masks(logits: torch.Tensor, matchers: list[Matcher | None]) -> None:
    """Masks, in place, the disallowed tokens of every row that has a matcher."""
    import xgrammar as xgr

    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
    for i in rows:
        matchers[i]._m.fill_next_token_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
