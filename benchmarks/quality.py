"""How well an engine predicts a fixed English text: mean log-likelihood per token.

Shared by `bench_quality.py` and `test/e2e/test_quality.py`. The text (data/quality_text.txt, an
essay on lighthouses) was written by hand for this repository: it is not model output and is not
copied from anywhere, so no model has seen it in training.

The text goes in as one prompt string, tokenized the way `LLM.generate` tokenizes any string
(`tokenizer.encode` with its default special tokens; SmolLM2's tokenizer adds no BOS, so the first
token is the text's own first token). Every token but the first is scored given the ones before
it (prompt logprobs, teacher forcing); the first has no context, so it is not scored:

    tokens:   t0   t1   t2  ...  t[n-1]
    scored:    -   lp1  lp2 ...  lp[n-1]      mean = (lp1 + ... + lp[n-1]) / (n - 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT_PATH = Path(__file__).resolve().parent / "data" / "quality_text.txt"

# Most a lossy format's mean loglik may differ from fp32's, relative (0.01 = 1%).
TARGETS = {"bf16": 0.01, "int8": 0.03, "gguf": 0.005}


@dataclass(frozen=True)
class TextScore:
    tokens: int  # tokens of the text, the unscored first one included
    mean_loglik: float  # mean natural-log probability of the scored tokens

    @property
    def perplexity(self) -> float:
        return math.exp(-self.mean_loglik)


def quality_text() -> str:
    return TEXT_PATH.read_text(encoding="utf-8")


def score_text(llm: Any, text: str | None = None) -> TextScore:
    """The mean loglik per token of `text` (default: the quality text) under `llm`."""
    from lmprog import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    out = llm.generate(text or quality_text(), params, use_tqdm=False)[0]
    if out.error is not None:
        raise RuntimeError(f"the engine failed to score the text: {out.error}")
    ids, entries = out.prompt_token_ids, out.prompt_logprobs
    assert entries is not None and len(entries) == len(ids) and entries[0] is None, (
        f"expected {len(ids)} prompt logprob entries, the first None; got "
        f"{None if entries is None else len(entries)}"
    )
    total = sum(entry[token].logprob for token, entry in zip(ids[1:], entries[1:]))
    return TextScore(tokens=len(ids), mean_loglik=total / (len(ids) - 1))


def relative_difference(value: float, reference: float) -> float:
    """(value - reference) / |reference|: negative when `value` predicts the text worse."""
    return (value - reference) / abs(reference)
