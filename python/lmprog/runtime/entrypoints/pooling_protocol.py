"""Request bodies of the pooling routes beyond embeddings, in vLLM's shapes (pydantic: a bad
field is a 400 naming it; unknown fields are ignored).

    /classify   {model, input}                    -> probs and label per input
    /pooling    {model, input}                    -> the model's raw output per input (reward)
    /v1/score   {model, text_1, text_2}           -> a score per pair (1:N or N:N)
    /v1/rerank  {model, query, documents, top_n}  -> documents by relevance (Jina / Cohere)
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

Inputs = str | list[str] | list[int] | list[list[int]]


class _Pooling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    truncate_prompt_tokens: int | None = None  # keep the last N tokens of each input
    user: str | None = None


class ClassifyRequest(_Pooling):
    input: Inputs


class PoolingRequest(_Pooling):
    input: Inputs


class ScoreRequest(_Pooling):
    text_1: str | list[str]
    text_2: str | list[str]


class RerankRequest(_Pooling):
    query: str
    documents: list[str]
    top_n: int | None = None  # the best N documents; None or 0: all of them
