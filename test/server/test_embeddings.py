"""An embedding server (all-MiniLM-L6-v2, an encoder) driven by the official `openai` client and
`requests`: vectors equal HF transformers' sentence embeddings, every input shape and option of
/v1/embeddings and /encode, and the errors of each kind of server."""

from __future__ import annotations

import base64
import struct
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
import torch
from conftest import start_server

EMBED_MODEL = "all-minilm-l6-v2"
SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an instrument.",
    "The stock market fell sharply today.",
]


@pytest.fixture(scope="module")
def embed_server():
    return start_server("--model-path", EMBED_MODEL)


@pytest.fixture(scope="module")
def embed_client(embed_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{embed_server.url}/v1", api_key="unused")


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers' recipe in HF transformers: BertModel, mean over the tokens,
    L2-normalize."""
    from transformers import BertModel

    from lmprog.runtime.model_loader import load_model

    loaded = load_model(EMBED_MODEL, torch.float32)
    hf = BertModel(loaded.config, add_pooling_layer=False).eval()
    hf.load_state_dict(dict(loaded.weights()), strict=False)

    def embed(text: str) -> torch.Tensor:
        ids = torch.tensor([loaded.tokenizer.encode(text)])
        with torch.inference_mode():
            hidden = hf(input_ids=ids).last_hidden_state[0]
        return torch.nn.functional.normalize(hidden.mean(0), dim=-1)

    return embed, loaded.tokenizer


def _cos(a: list[float], b: list[float]) -> float:
    return float(torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=0))


def test_vectors_match_hf_and_rank_related_sentences(embed_client, reference) -> None:
    embed, tokenizer = reference
    r = embed_client.embeddings.create(model=EMBED_MODEL, input=SENTENCES, encoding_format="float")
    vectors = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and len(vectors[0]) == 384
    for text, vector in zip(SENTENCES, vectors):
        assert torch.allclose(torch.tensor(vector), embed(text), atol=1e-5)
    assert _cos(vectors[0], vectors[1]) > _cos(vectors[0], vectors[2]) + 0.3
    assert r.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in SENTENCES)
    assert r.model == EMBED_MODEL


def test_input_shapes_formats_and_dimensions(embed_server, embed_client, reference) -> None:
    _, tokenizer = reference
    url = f"{embed_server.url}/v1/embeddings"
    one = requests.post(url, json={"input": SENTENCES[0]}).json()["data"][0]["embedding"]
    ids = tokenizer.encode(SENTENCES[0])
    by_ids = requests.post(url, json={"input": ids}).json()["data"][0]["embedding"]
    by_id_lists = requests.post(url, json={"input": [ids, ids[:4]]}).json()["data"]
    assert by_ids == pytest.approx(one, abs=1e-6)
    assert by_id_lists[0]["embedding"] == pytest.approx(one, abs=1e-6)
    encoded = requests.post(url, json={"input": SENTENCES[0], "encoding_format": "base64"})
    raw = base64.b64decode(encoded.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(one, abs=1e-6)
    # the openai client asks for base64 by default and decodes it
    decoded = embed_client.embeddings.create(model=EMBED_MODEL, input=SENTENCES[0])
    assert decoded.data[0].embedding == pytest.approx(one, abs=1e-6)
    short = embed_client.embeddings.create(
        model=EMBED_MODEL, input=SENTENCES[0], dimensions=64, encoding_format="float"
    )
    head = torch.tensor(one[:64])
    assert short.data[0].embedding == pytest.approx((head / head.norm()).tolist(), abs=1e-6)


def test_native_encode(embed_server, reference) -> None:
    _, tokenizer = reference
    single = requests.post(f"{embed_server.url}/encode", json={"text": SENTENCES[1]}).json()
    assert len(single["embedding"]) == 384
    assert single["meta_info"]["prompt_tokens"] == len(tokenizer.encode(SENTENCES[1]))
    batch = requests.post(f"{embed_server.url}/encode", json={"text": SENTENCES}).json()
    assert [len(b["embedding"]) for b in batch] == [384] * 3
    assert batch[1]["embedding"] == pytest.approx(single["embedding"], abs=1e-6)


def test_concurrent_requests_each_get_their_own_vector(embed_server) -> None:
    url = f"{embed_server.url}/v1/embeddings"
    texts = [f"Sentence number {i} is about {w}." for i, w in enumerate(["cats", "tax"] * 8)]
    alone = [requests.post(url, json={"input": t}).json()["data"][0]["embedding"] for t in texts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda t: requests.post(url, json={"input": t}).json(), texts))
    for a, t in zip(alone, together):
        assert t["data"][0]["embedding"] == pytest.approx(a, abs=1e-5)


def test_model_info_says_embedding(embed_server, embed_client) -> None:
    info = requests.get(f"{embed_server.url}/get_model_info").json()
    assert info["is_generation"] is False and info["is_embedding"] is True
    assert info["embedding_dim"] == 384 and info["context_length"] == 256
    assert [(m.id, m.task) for m in embed_client.models.list().data] == [(EMBED_MODEL, "embed")]
    assert requests.get(f"{embed_server.url}/health_generate", timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("route", "body", "status", "needles"),
    [
        ("/v1/embeddings", {"input": "word " * 300}, 400, ["302", "256"]),
        ("/v1/embeddings", {"input": ""}, 400, ["empty"]),
        ("/v1/embeddings", {"input": []}, 400, ["input"]),
        ("/v1/embeddings", {"input": [[]]}, 400, ["input"]),
        ("/v1/embeddings", {"input": "x", "model": "text-embedding-3-small"}, 404, ["model"]),
        ("/v1/embeddings", {"input": "x", "dimensions": 999}, 400, ["dimensions", "384"]),
        ("/v1/embeddings", {"input": [1, 10**9]}, 400, ["1000000000", "vocabulary"]),
        ("/v1/completions", {"prompt": "x"}, 400, ["embedding model"]),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}]},
            400,
            ["embedding model"],
        ),
        ("/generate", {"text": "x"}, 400, ["embedding model"]),
    ],
)
def test_bad_input_is_a_400_naming_the_limit(embed_server, route, body, status, needles) -> None:
    r = requests.post(f"{embed_server.url}{route}", json=body)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert all(n in message for n in needles), message
    assert requests.get(f"{embed_server.url}/health").status_code == 200


def test_truncate_prompt_tokens_keeps_the_last_tokens(embed_server) -> None:
    url = f"{embed_server.url}/v1/embeddings"
    r = requests.post(url, json={"input": "word " * 300, "truncate_prompt_tokens": 200}).json()
    assert r["usage"]["prompt_tokens"] == 200 and len(r["data"][0]["embedding"]) == 384


def test_score_and_rerank_by_cosine_similarity(embed_server, reference) -> None:
    """An embedder scores a pair by the cosine of the two embeddings (the query embedded once)."""
    embed, tokenizer = reference
    query, docs = SENTENCES[0], SENTENCES[:0:-1]  # the unrelated sentence first
    r = requests.post(f"{embed_server.url}/v1/score", json={"text_1": query, "text_2": docs})
    expected = [float(embed(query) @ embed(d)) for d in docs]
    assert [d["score"] for d in r.json()["data"]] == pytest.approx(expected, abs=1e-5)
    tokens = sum(len(tokenizer.encode(t)) for t in [query, *docs])
    assert r.json()["usage"]["prompt_tokens"] == tokens
    body = {"query": query, "documents": docs}
    ranked = requests.post(f"{embed_server.url}/v1/rerank", json=body).json()["results"]
    assert [x["index"] for x in ranked] == [1, 0]  # "Someone plays an instrument." first
    assert ranked[0]["relevance_score"] == pytest.approx(expected[1], abs=1e-5)
    refused = requests.post(f"{embed_server.url}/classify", json={"input": "x"})
    assert refused.status_code == 400
    assert "embedding model: classify" in refused.json()["error"]["message"]


def test_embeddings_on_a_generation_server_are_refused(server) -> None:
    r = requests.post(f"{server.url}/v1/embeddings", json={"input": "x"})
    assert r.status_code == 400 and "generation model" in r.json()["error"]["message"]
    r = requests.post(f"{server.url}/encode", json={"text": "x"})
    assert r.status_code == 400
