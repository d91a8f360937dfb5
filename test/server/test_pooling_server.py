"""Servers of tiny random-weight classifiers (a BERT cross-encoder, a Qwen2 classifier, a Qwen3
token classifier), driven with `requests` and the official `openai` client: /classify,
/v1/score, /v1/rerank and /pooling against HF transformers (to 1e-4), bad input as 400s naming
the field, and each server refusing the routes of other tasks, saying what it serves."""

from __future__ import annotations

import openai
import pytest
import requests
import torch
from conftest import start_server
from pooling_models import hf_logits, save_tiny, tokenizer

TOL = 1e-4
LABELS = ["negative", "neutral", "positive"]
QUERY = "What is the capital of France?"
DOCS = ["Paris is the capital of France.", "Bananas are yellow.", "France is in Europe."]


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("cross-encoder")
    hf = save_tiny(path, "BertForSequenceClassification", ["relevance"])
    return start_server("--model-path", str(path), "--served-model-name", "ce"), hf


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    path = tmp_path_factory.mktemp("classifier")
    hf = save_tiny(path, "Qwen2ForSequenceClassification", LABELS)
    return start_server("--model-path", str(path), "--max-total-tokens", "2048"), hf


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    path = tmp_path_factory.mktemp("tagger")
    hf = save_tiny(path, "Qwen3ForTokenClassification", ["bad", "good"])
    server = start_server("--model-path", str(path), "--max-total-tokens", "2048", "--is-embedding")
    return server, hf


def _pair_score(hf, a: str, b: str) -> float:
    enc = tokenizer("Bert")(a, b)
    return hf_logits(hf, enc["input_ids"], enc["token_type_ids"]).sigmoid().item()


def test_score_is_the_cross_encoders_sigmoid(cross_encoder) -> None:
    server, hf = cross_encoder
    r = requests.post(f"{server.url}/v1/score", json={"text_1": QUERY, "text_2": DOCS}).json()
    assert r["object"] == "list" and r["model"] == "ce" and r["id"].startswith("score-")
    assert [(d["index"], d["object"]) for d in r["data"]] == [
        (0, "score"),
        (1, "score"),
        (2, "score"),
    ]
    for doc, d in zip(DOCS, r["data"]):
        assert d["score"] == pytest.approx(_pair_score(hf, QUERY, doc), abs=TOL)
    tok = tokenizer("Bert")
    assert r["usage"]["prompt_tokens"] == sum(len(tok(QUERY, d)["input_ids"]) for d in DOCS)
    pairwise = requests.post(
        f"{server.url}/score", json={"model": "ce", "text_1": DOCS[:2], "text_2": DOCS[1:]}
    ).json()
    expected = [_pair_score(hf, DOCS[0], DOCS[1]), _pair_score(hf, DOCS[1], DOCS[2])]
    assert [d["score"] for d in pairwise["data"]] == pytest.approx(expected, abs=TOL)
    single = requests.post(f"{server.url}/v1/score", json={"text_1": DOCS[0], "text_2": QUERY})
    assert single.json()["data"][0]["score"] == pytest.approx(
        _pair_score(hf, DOCS[0], QUERY), abs=TOL
    )


def test_rerank_orders_documents_by_relevance(cross_encoder) -> None:
    server, hf = cross_encoder
    expected = [_pair_score(hf, QUERY, doc) for doc in DOCS]
    best_first = sorted(range(3), key=lambda i: -expected[i])
    body = {"model": "ce", "query": QUERY, "documents": DOCS, "top_n": 2}
    r = requests.post(f"{server.url}/v1/rerank", json=body).json()
    assert r["id"].startswith("rerank-") and r["model"] == "ce"
    assert [x["index"] for x in r["results"]] == best_first[:2]
    for x in r["results"]:
        assert x["document"] == {"text": DOCS[x["index"]]}
        assert x["relevance_score"] == pytest.approx(expected[x["index"]], abs=TOL)
    tok = tokenizer("Bert")
    assert r["usage"]["total_tokens"] == sum(len(tok(QUERY, d)["input_ids"]) for d in DOCS)
    every = requests.post(f"{server.url}/rerank", json={**body, "top_n": 0}).json()
    assert [x["index"] for x in every["results"]] == best_first


def test_classify_gives_probs_and_the_best_label(classifier) -> None:
    server, hf = classifier
    texts = ["Hello, my name is", "Great!"]
    r = requests.post(f"{server.url}/classify", json={"input": texts}).json()
    assert (
        r["object"] == "list" and r["id"].startswith("classify-") and isinstance(r["created"], int)
    )
    tok = tokenizer("Llama")
    for i, (text, d) in enumerate(zip(texts, r["data"])):
        probs = hf_logits(hf, tok.encode(text)).softmax(-1)
        assert d["index"] == i and d["num_classes"] == 3
        assert d["probs"] == pytest.approx(probs.tolist(), abs=TOL)
        assert d["label"] == LABELS[int(probs.argmax())]
    tokens = sum(len(tok.encode(t)) for t in texts)
    assert r["usage"] == {
        "prompt_tokens": tokens,
        "total_tokens": tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }
    by_ids = requests.post(f"{server.url}/v1/classify", json={"input": tok.encode(texts[1])})
    assert by_ids.json()["data"][0]["probs"] == pytest.approx(r["data"][1]["probs"], abs=TOL)
    info = requests.get(f"{server.url}/get_model_info").json()
    assert info["pooling_task"] == "classify" and info["labels"] == LABELS
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    assert [m.task for m in client.models.list().data] == ["classify"]


def test_pooling_returns_raw_logits(classifier, tagger) -> None:
    text = "The capital of France is Paris."
    ids = tokenizer("Llama").encode(text)
    for (server, hf), shape in ((classifier, (3,)), (tagger, (len(ids), 2))):
        r = requests.post(f"{server.url}/pooling", json={"input": [text]}).json()
        assert r["id"].startswith("pool-") and r["data"][0]["object"] == "pooling"
        data = torch.tensor(r["data"][0]["data"])
        assert data.shape == shape
        assert torch.allclose(data, hf_logits(hf, ids), atol=TOL)
        assert requests.get(f"{server.url}/health_generate", timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("which", "route", "body", "needles"),
    [
        ("cross_encoder", "/v1/embeddings", {"input": "x"}, ["classification model", "/classify"]),
        ("classifier", "/v1/score", {"text_1": "a", "text_2": "b"}, ["cross-encoder", "3 labels"]),
        ("classifier", "/v1/rerank", {"query": "a", "documents": ["b"]}, ["cross-encoder"]),
        ("tagger", "/classify", {"input": "x"}, ["token classification", "/pooling"]),
        ("tagger", "/generate", {"text": "x"}, ["token classification", "generation model"]),
    ],
)
def test_each_server_refuses_other_tasks(request, which, route, body, needles) -> None:
    server, _ = request.getfixturevalue(which)
    r = requests.post(f"{server.url}{route}", json=body)
    assert r.status_code == 400, r.text
    assert all(n in r.json()["error"]["message"] for n in needles), r.text


def test_chat_on_a_classifier_is_refused_through_the_client(classifier) -> None:
    client = openai.OpenAI(base_url=f"{classifier[0].url}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError, match="classification model.*/classify"):
        client.chat.completions.create(
            model=client.models.list().data[0].id, messages=[{"role": "user", "content": "hi"}]
        )


def test_a_generation_server_refuses_pooling_routes(server) -> None:
    r = requests.post(f"{server.url}/classify", json={"input": "x"})
    assert r.status_code == 400
    assert "generation model: classify needs a classification model" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("route", "body", "param", "needles"),
    [
        ("/v1/score", {"text_1": ["a", "b"], "text_2": DOCS}, "text_2", ["2", "3"]),
        ("/v1/score", {"text_1": "a", "text_2": []}, "text_2", ["non-empty"]),
        ("/v1/score", {"text_1": "", "text_2": "b"}, "text_1", ["empty"]),
        ("/v1/score", {"text_1": "a", "text_2": "word " * 80}, "text_2", ["tokens", "64"]),
        (
            "/v1/score",
            {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": 2},
            "truncate_prompt_tokens",
            ["cannot hold the pair"],
        ),
        ("/v1/score", {"text_1": "a"}, "text_2", ["text_2"]),
        ("/v1/rerank", {"query": "a", "documents": ["b"], "top_n": -1}, "top_n", ["-1"]),
        ("/v1/rerank", {"query": "a", "documents": []}, "documents", ["non-empty"]),
        ("/v1/rerank", {"documents": ["b"]}, "query", ["query"]),
        ("/classify", {"input": ""}, "input", ["empty"]),
        ("/classify", {"input": "word " * 80}, "input", ["82 tokens", "64"]),
        (
            "/classify",
            {"input": "x", "truncate_prompt_tokens": 0},
            "truncate_prompt_tokens",
            [">= 1"],
        ),
        ("/pooling", {"input": [[1, 10**9]]}, "input", ["1000000000", "vocabulary"]),
    ],
)
def test_bad_input_is_a_400_naming_the_field(cross_encoder, route, body, param, needles) -> None:
    server, _ = cross_encoder
    r = requests.post(f"{server.url}{route}", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert all(n in error["message"] for n in needles), error
    assert error["param"] == param, error
    assert requests.get(f"{server.url}/health").status_code == 200


def test_another_model_name_is_a_404(cross_encoder) -> None:
    r = requests.post(
        f"{cross_encoder[0].url}/v1/score", json={"model": "bge", "text_1": "a", "text_2": "b"}
    )
    assert r.status_code == 404 and "'ce'" in r.json()["error"]["message"]
