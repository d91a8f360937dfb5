"""Offline embeddings: LLM.embed / LLM.score on the embedded encoder (all-MiniLM-L6-v2) and on a
decoder served as an embedder (SmolLM2 with runner="pooling"), both against HF transformers on
the same weights."""

from __future__ import annotations

import pytest
import torch

from lmprog.runtime.engine.outputs import EmbeddingRequestOutput

EMBED_MODEL = "all-minilm-l6-v2"
SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an instrument.",
    "The stock market fell sharply today.",
]


@pytest.fixture(scope="module")
def minilm(engine_factory):
    return engine_factory(model=EMBED_MODEL)


def _hf_sentence_embedding(loaded, text: str) -> torch.Tensor:
    from transformers import BertModel

    hf = BertModel(loaded.config, add_pooling_layer=False).eval()
    hf.load_state_dict(dict(loaded.weights()), strict=False)
    with torch.inference_mode():
        hidden = hf(input_ids=torch.tensor([loaded.tokenizer.encode(text)])).last_hidden_state
    return torch.nn.functional.normalize(hidden[0].mean(0), dim=-1)


def test_embed_matches_hf_mean_pooling(minilm) -> None:
    outs = minilm.embed(SENTENCES, use_tqdm=False)
    assert all(isinstance(o, EmbeddingRequestOutput) and o.finished for o in outs)
    loaded = minilm.scheduler.model_runner.loaded
    for text, out in zip(SENTENCES, outs):
        assert out.prompt_token_ids == loaded.tokenizer.encode(text)
        assert out.outputs.hidden_size == 384
        ref = _hf_sentence_embedding(loaded, text)
        assert torch.allclose(torch.tensor(out.outputs.embedding), ref, atol=1e-5)
    assert minilm.get_kv_stats()["held_by_requests"] == 0


def test_score_ranks_related_sentences(minilm) -> None:
    scores = minilm.score(SENTENCES[0], SENTENCES[1:], use_tqdm=False)
    related, unrelated = (s.outputs.score for s in scores)
    assert related > unrelated + 0.3 and -1 <= unrelated <= related <= 1
    pairwise = minilm.score(SENTENCES[:2], SENTENCES[1:], use_tqdm=False)
    assert pairwise[0].outputs.score == pytest.approx(related, abs=1e-6)
    with pytest.raises(ValueError, match="data_1 has 2 and data_2 3"):
        minilm.score(SENTENCES[:2], SENTENCES, use_tqdm=False)


def test_limits_truncation_and_the_wrong_kind_of_call(minilm, llm) -> None:
    long = "word " * 300
    with pytest.raises(ValueError, match="302 tokens.*at most 256"):
        minilm.embed(long, use_tqdm=False)
    out = minilm.embed(long, truncate_prompt_tokens=100, use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == 100
    with pytest.raises(ValueError, match="embedding model: generate"):
        minilm.generate("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="generation model: embed"):
        llm.embed("hello", use_tqdm=False)


def test_a_decoder_as_embedder_pools_its_last_token(engine_factory, llm) -> None:
    """SmolLM2 with runner="pooling": the last token's final hidden state, normalized, equal to
    HF's; prefilled in 16-token chunks, and again from the prefix cache."""
    from transformers import AutoModelForCausalLM

    embedder = engine_factory(
        runner="pooling", seed=0, max_total_tokens=4096, chunked_prefill_size=16
    )
    text = "Paris is the capital of France, and Berlin is the capital of Germany. " * 3
    first = embedder.embed(text, use_tqdm=False)[0].outputs.embedding
    again = embedder.embed(text, use_tqdm=False)[0].outputs.embedding
    assert embedder.get_cache_stats()["hit_tokens"] > 0
    loaded = llm.scheduler.model_runner.loaded
    hf = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32).eval()
    hf.load_state_dict(dict(loaded.weights()), strict=False)
    ids = embedder.get_tokenizer().encode(text)
    assert len(ids) > 32  # several chunks
    with torch.inference_mode():
        hidden = hf.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    ref = torch.nn.functional.normalize(hidden, dim=-1)
    assert len(first) == 576
    assert torch.allclose(torch.tensor(first), ref, atol=1e-5)
    assert torch.allclose(torch.tensor(again), ref, atol=1e-5)
