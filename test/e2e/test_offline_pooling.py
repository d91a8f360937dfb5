"""Offline classify / reward / cross-encoder score on tiny random-weight classifiers of the Llama
family and of BERT, each against the HF transformers model it was saved from (to 1e-4), and the
calls each kind of model refuses, saying what it answers instead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pooling_models import PAD, hf_logits, save_tiny, tokenizer

from lmprog.runtime.engine.outputs import ClassificationRequestOutput, PoolingRequestOutput

TOL = 1e-4
LABELS = ["negative", "neutral", "positive"]
PROMPTS = [
    "Hello, my name is",
    "The capital of France is Paris, a city of museums, bridges and cafes by the Seine.",
    "Great!",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    """name -> (folder, HF reference model), built once for the module."""
    specs = {
        "llama-3": ("LlamaForSequenceClassification", LABELS),
        "qwen2-3": ("Qwen2ForSequenceClassification", LABELS),
        "qwen3-3": ("Qwen3ForSequenceClassification", LABELS),
        "llama-reward": ("LlamaForSequenceClassification", ["reward"]),
        "qwen3-token": ("Qwen3ForTokenClassification", ["bad", "good"]),
        "bert-3": ("BertForSequenceClassification", LABELS),
        "bert-cross": ("BertForSequenceClassification", ["relevance"]),
        "bert-token": ("BertForTokenClassification", ["O", "B", "I"]),
    }
    built = {}
    for name, (arch, labels) in specs.items():
        path = tmp_path_factory.mktemp(name)
        built[name] = (path, save_tiny(path, arch, labels))
    return built


def _engine(engine_factory, models, name: str, **kwargs):
    # A small KV pool: the default byte budget would hold millions of these tiny tokens.
    return engine_factory(model=str(models[name][0]), max_total_tokens=2048, **kwargs)


def _ids(family: str, text: str) -> list[int]:
    return tokenizer(family).encode(text)


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(-1) if logits.numel() > 1 else logits.sigmoid()


@pytest.mark.parametrize("name", ["llama-3", "qwen2-3", "qwen3-3"])
def test_decoder_classifier_matches_hf_in_chunks_and_from_the_cache(
    engine_factory, models, name: str
) -> None:
    """Prefilled in 8-token chunks, then again over the cached prefix: HF's probabilities."""
    llm = _engine(engine_factory, models, name, chunked_prefill_size=8)
    hf = models[name][1]
    outs = llm.classify(PROMPTS, use_tqdm=False)
    again = llm.classify(PROMPTS, use_tqdm=False)
    assert llm.get_cache_stats()["hit_tokens"] > 0
    assert len(_ids("Llama", PROMPTS[1])) > 16  # several chunks
    for text, out, second in zip(PROMPTS, outs, again):
        assert isinstance(out, ClassificationRequestOutput) and out.finished
        ids = _ids("Llama", text)
        assert out.prompt_token_ids == ids
        assert out.outputs.num_classes == 3
        expected = _probs(hf_logits(hf, ids))
        assert torch.allclose(torch.tensor(out.outputs.probs), expected, atol=TOL)
        assert torch.allclose(torch.tensor(second.outputs.probs), expected, atol=TOL)
    rewards = llm.reward(PROMPTS[0], use_tqdm=False)
    assert torch.allclose(
        rewards[0].outputs.data, hf_logits(hf, _ids("Llama", PROMPTS[0])), atol=TOL
    )


def test_trailing_pad_tokens_are_skipped_as_hf_does(engine_factory, models) -> None:
    """HF classifies from the last token that is not the pad token."""
    llm = _engine(engine_factory, models, "qwen2-3")
    hf = models["qwen2-3"][1]
    ids = _ids("Llama", PROMPTS[0])
    padded = [*ids, PAD, PAD]
    out, plain = llm.classify([padded, ids], use_tqdm=False)
    assert out.prompt_token_ids == padded
    expected = _probs(hf_logits(hf, padded))
    assert torch.allclose(torch.tensor(out.outputs.probs), expected, atol=TOL)
    assert out.outputs.probs == pytest.approx(plain.outputs.probs, abs=TOL)


def test_a_reward_model_gives_one_scalar_and_scores_pairs(engine_factory, models) -> None:
    """One label: reward() is the raw logit, classify() its sigmoid, score() the sigmoid of
    the pair read as one input."""
    llm = _engine(engine_factory, models, "llama-reward")
    hf = models["llama-reward"][1]
    rewards = llm.reward(PROMPTS, use_tqdm=False)
    for text, out in zip(PROMPTS, rewards):
        assert isinstance(out, PoolingRequestOutput) and out.outputs.data.shape == (1,)
        assert out.outputs.data[0].item() == pytest.approx(
            hf_logits(hf, _ids("Llama", text)).item(), abs=TOL
        )
    (probs,) = llm.classify(PROMPTS[2], use_tqdm=False)
    assert probs.outputs.probs[0] == pytest.approx(torch.sigmoid(rewards[2].outputs.data).item())
    scores = llm.score(PROMPTS[0], PROMPTS[1:], use_tqdm=False)
    for doc, out in zip(PROMPTS[1:], scores):
        pair = tokenizer("Llama")(PROMPTS[0], doc)["input_ids"]
        assert out.prompt_token_ids == pair
        assert out.outputs.score == pytest.approx(hf_logits(hf, pair).sigmoid().item(), abs=TOL)


def test_a_token_classifier_scores_every_token(engine_factory, models) -> None:
    """Per-token logits gathered over 8-token chunks; no prefix comes from the cache (a cached
    token would have no output)."""
    llm = _engine(engine_factory, models, "qwen3-token", chunked_prefill_size=8)
    hf = models["qwen3-token"][1]
    for _ in range(2):
        outs = llm.reward(PROMPTS, use_tqdm=False)
        for text, out in zip(PROMPTS, outs):
            ids = _ids("Llama", text)
            assert out.outputs.data.shape == (len(ids), 2)
            assert torch.allclose(out.outputs.data, hf_logits(hf, ids), atol=TOL)
    assert llm.get_cache_stats()["hit_tokens"] == 0


def test_bert_classifiers_match_hf(engine_factory, models) -> None:
    """CLS + pooler + classifier, batched sequences of different lengths; a token classifier's
    logits per token."""
    llm = _engine(engine_factory, models, "bert-3")
    hf = models["bert-3"][1]
    for text, out in zip(PROMPTS, llm.classify(PROMPTS, use_tqdm=False)):
        expected = _probs(hf_logits(hf, _ids("Bert", text)))
        assert torch.allclose(torch.tensor(out.outputs.probs), expected, atol=TOL)
    tagger = _engine(engine_factory, models, "bert-token")
    hf_tagger = models["bert-token"][1]
    for text, out in zip(PROMPTS, tagger.reward(PROMPTS, use_tqdm=False)):
        ids = _ids("Bert", text)
        assert out.outputs.data.shape == (len(ids), 3)
        assert torch.allclose(out.outputs.data, hf_logits(hf_tagger, ids), atol=TOL)


def test_bert_cross_encoder_scores_pairs_with_their_segments(engine_factory, models) -> None:
    """The pair as HF reads it, "[CLS] a [SEP] b [SEP]" with token types 0 then 1: one text
    against many, pairwise, and cut to truncate_prompt_tokens."""
    llm = _engine(engine_factory, models, "bert-cross")
    hf = models["bert-cross"][1]
    tok = tokenizer("Bert")
    query, docs = "What is the capital of France?", ["Paris is.", "Bananas are yellow fruit."]

    def expected(a: str, b: str) -> float:
        enc = tok(a, b)
        return hf_logits(hf, enc["input_ids"], enc["token_type_ids"]).sigmoid().item()

    one_to_many = llm.score(query, docs, use_tqdm=False)
    pairwise = llm.score([query, docs[1]], docs, use_tqdm=False)
    for doc, out in zip(docs, one_to_many):
        assert out.prompt_token_ids == tok(query, doc)["input_ids"]
        assert out.outputs.score == pytest.approx(expected(query, doc), abs=TOL)
    assert pairwise[0].outputs.score == pytest.approx(one_to_many[0].outputs.score, abs=TOL)
    assert pairwise[1].outputs.score == pytest.approx(expected(docs[1], docs[1]), abs=TOL)
    # The order of the pair matters (the segments differ).
    assert llm.score(docs[0], query, use_tqdm=False)[0].outputs.score != pytest.approx(
        one_to_many[0].outputs.score, abs=TOL
    )
    cut = llm.score(query, docs[1], truncate_prompt_tokens=10, use_tqdm=False)[0]
    assert len(cut.prompt_token_ids) == 10
    with pytest.raises(ValueError, match="truncate_prompt_tokens=2 cannot hold the pair"):
        llm.score(query, docs[1], truncate_prompt_tokens=2, use_tqdm=False)
    with pytest.raises(ValueError, match="data_1 has 2 and data_2 3"):
        llm.score(docs, [*docs, query], use_tqdm=False)


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny decoder LM: it generates by default, and embeds with runner="pooling"."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-causal")
    tok = tokenizer("Llama")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_each_model_answers_its_own_calls(engine_factory, models, causal_dir) -> None:
    """The architecture decides the task; any other call is refused, naming what the model
    answers instead."""
    classifier = _engine(engine_factory, models, "qwen2-3")
    with pytest.raises(ValueError, match="score needs a cross-encoder.*3 labels"):
        classifier.score("a", "b", use_tqdm=False)
    with pytest.raises(ValueError, match="classification model: embed needs an embedding model"):
        classifier.embed("a", use_tqdm=False)
    with pytest.raises(ValueError, match="classification model: generate needs.*classify"):
        classifier.generate("a", use_tqdm=False)
    tagger = _engine(engine_factory, models, "qwen3-token")
    with pytest.raises(ValueError, match="classify needs.*this model answers reward\\(\\)"):
        tagger.classify("a", use_tqdm=False)
    generator = engine_factory(model=str(causal_dir), max_total_tokens=2048)
    with pytest.raises(ValueError, match="generation model: classify needs a classification"):
        generator.classify("a", use_tqdm=False)
    embedder = engine_factory(model=str(causal_dir), runner="pooling", max_total_tokens=2048)
    assert len(embedder.embed("a", use_tqdm=False)[0].outputs.embedding) == 64
    with pytest.raises(ValueError, match="embedding model: reward needs a reward model"):
        embedder.reward("a", use_tqdm=False)
    with pytest.raises(ValueError, match="embedding model: classify needs"):
        engine_factory(model=str(causal_dir), task="classify", max_total_tokens=2048)
    with pytest.raises(ValueError, match="pooling model: it cannot generate"):
        engine_factory(model=str(models["bert-3"][0]), runner="generate")
    with pytest.raises(ValueError, match="runner must be one of auto, generate, pooling"):
        engine_factory(model=str(causal_dir), runner="embed")


@pytest.mark.parametrize(
    ("script", "name", "needle"),
    [
        ("classify.py", "qwen2-3", "| label '"),
        ("score.py", "bert-cross", "Score: 0."),
        ("reward.py", "llama-reward", "'I like turtles.' | reward "),
    ],
)
def test_example_runs(models, script: str, name: str, needle: str) -> None:
    """The examples name real hub ids; here they run on the tiny local folders."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, str(root / "examples" / script), "--model", str(models[name][0])],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(root / "python"), HF_HUB_OFFLINE="1"),
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert needle in out.stdout, out.stdout
