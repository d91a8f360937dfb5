"""Every endpoint of the default server, driven by `requests` and the official `openai` client."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
import requests

MODEL = "smollm2-135m-instruct"
GERMANY = [{"role": "user", "content": "What is the capital of Germany?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


def sse_events(response: requests.Response) -> list:
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- native ---------------------------------------------------------------------------------
def test_health_info_and_models(server, client) -> None:
    assert requests.get(f"{server.url}/health").json() == {"status": "ok"}
    assert requests.get(f"{server.url}/health_generate", timeout=30).status_code == 200
    info = requests.get(f"{server.url}/get_model_info").json()
    assert info["served_model_name"] == MODEL and info["context_length"] == 8192
    assert [m.id for m in client.models.list().data] == [MODEL]
    kv = server.kv()
    assert kv["free"] + kv["evictable"] + kv["protected"] == kv["total"]


def test_generate_single_batch_and_stream(server) -> None:
    body = {
        "text": "The capital of France is",
        "sampling_params": {"max_new_tokens": 6, "temperature": 0},
    }
    one = requests.post(f"{server.url}/generate", json=body).json()
    assert "Paris" in one["text"]
    meta = one["meta_info"]
    assert meta["completion_tokens"] == 6 and meta["finish_reason"] == {"type": "length"}
    assert meta["prompt_tokens"] == 5
    batch = requests.post(
        f"{server.url}/generate",
        json={
            "text": ["The capital of France is", "1, 2, 3,"],
            "sampling_params": {"max_new_tokens": 6, "temperature": 0},
        },
    ).json()
    assert batch[0]["text"] == one["text"] and " 4" in batch[1]["text"]
    assert batch[0]["meta_info"]["cached_tokens"] >= 4  # the same prompt again
    with requests.post(f"{server.url}/generate", json=body | {"stream": True}, stream=True) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert events[-2]["text"] == one["text"]  # cumulative text; joined == non-streamed
    assert events[-2]["meta_info"]["finish_reason"] == {"type": "length"}


def test_generate_vllm_shape_ids_and_logprobs(server) -> None:
    r = requests.post(
        f"{server.url}/generate", json={"prompt": "1, 2, 3,", "max_tokens": 3, "temperature": 0}
    )
    assert r.status_code == 200 and " 4" in r.json()["text"]
    ids = requests.post(f"{server.url}/tokenize", json={"text": "1, 2, 3,"}).json()["tokens"]
    r = requests.post(
        f"{server.url}/generate",
        json={
            "input_ids": ids,
            "return_logprob": True,
            "top_logprobs_num": 2,
            "sampling_params": {"max_new_tokens": 3, "temperature": 0},
        },
    ).json()
    meta = r["meta_info"]
    assert [t for _, t, _ in meta["output_token_logprobs"]] == r["output_ids"]
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])
    text = requests.post(f"{server.url}/detokenize", json={"tokens": r["output_ids"]}).json()[
        "text"
    ]
    assert text == r["text"]


def test_flush_cache_frees_everything(server) -> None:
    requests.post(
        f"{server.url}/generate",
        json={"text": "Hello there", "sampling_params": {"max_new_tokens": 2}},
    )
    assert server.kv()["evictable"] > 0
    assert requests.post(f"{server.url}/flush_cache").json()["success"]
    kv = server.kv()
    assert kv["free"] == kv["total"]


# ---- OpenAI ---------------------------------------------------------------------------------
def test_completions(client) -> None:
    r = client.completions.create(
        model=MODEL, prompt=["1, 2, 3,", "a, b, c,"], max_tokens=4, temperature=0, n=2, logprobs=2
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and " 4" in r.choices[0].text
    assert " d" in r.choices[2].text
    assert len(r.choices[0].logprobs.token_logprobs) == 4
    assert r.usage.completion_tokens == 16
    ids = client.completions.create(model=MODEL, prompt=[16, 28, 216], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 3
    echo = client.completions.create(
        model=MODEL, prompt="1, 2, 3,", max_tokens=2, temperature=0, echo=True
    )
    assert echo.choices[0].text.startswith("1, 2, 3,")
    stop = client.completions.create(
        model=MODEL, prompt="1, 2, 3,", max_tokens=20, temperature=0, stop=[" 6"]
    )
    assert stop.choices[0].finish_reason == "stop" and "6" not in stop.choices[0].text


def test_completion_stream_joins_to_the_same_text(client) -> None:
    kw = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24


def test_chat(client) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=GERMANY, max_tokens=16, temperature=0, logprobs=True, top_logprobs=2
    )
    assert "Berlin" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    again = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": GERMANY[0]["content"]}]}],
        max_completion_tokens=16,
        temperature=0,
    )
    assert again.choices[0].message.content == r.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    stream = client.chat.completions.create(
        model=MODEL, messages=GERMANY, max_tokens=16, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_32_concurrent_requests_each_get_their_own_answer(server, client) -> None:
    prompts = [f"{i}, {i + 1}, {i + 2}," for i in range(10, 42)]
    kw = {"model": MODEL, "max_tokens": 4, "temperature": 0}
    alone = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]

    async def main() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused")
        tasks = [aclient.completions.create(prompt=p, **kw) for p in prompts]
        return [r.choices[0].text for r in await asyncio.gather(*tasks)]

    assert asyncio.run(main()) == alone
    assert sum(t.startswith(f" {i + 3},") for i, t in zip(range(10, 42), alone)) > 24


# ---- logit_bias ------------------------------------------------------------------------------
def _one_token(server, text: str) -> int:
    (token,) = requests.post(f"{server.url}/tokenize", json={"text": text}).json()["tokens"]
    return token


def test_logit_bias_forces_a_token_on_every_route(server, client) -> None:
    banana = _one_token(server, " banana")
    bias = {str(banana): 100}  # what the openai client sends: string keys
    kw = {"model": MODEL, "max_tokens": 4, "temperature": 0, "logit_bias": bias}
    completion = client.completions.create(prompt="1, 2, 3,", **kw)
    assert completion.choices[0].text == " banana" * 4
    chat = client.chat.completions.create(messages=GERMANY, **kw)
    assert chat.choices[0].message.content.count("banana") == 4
    native = requests.post(
        f"{server.url}/generate",
        json={
            "text": "1, 2, 3,",
            "sampling_params": {"max_new_tokens": 4, "temperature": 0, "logit_bias": bias},
        },
    ).json()
    assert native["output_ids"] == [banana] * 4


@pytest.mark.parametrize(
    ("bias", "needles"),
    [
        ({"99999": -100}, ["logit_bias", "99999", "vocabulary"]),
        ({"5": 101}, ["logit_bias", "[-100, 100]", "101"]),
    ],
)
def test_bad_logit_bias_is_a_400(server, client, bias, needles) -> None:
    for create, kw in (
        (client.completions.create, {"prompt": "x"}),
        (client.chat.completions.create, {"messages": GERMANY}),
    ):
        with pytest.raises(openai.BadRequestError) as error:
            create(model=MODEL, max_tokens=2, logit_bias=bias, **kw)
        assert error.value.status_code == 400
        assert all(needle in str(error.value) for needle in needles), str(error.value)
    assert requests.get(f"{server.url}/health").status_code == 200


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("route", "body", "status", "needle"),
    [
        ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0, "n": 2}, 400, "n"),
        ("/generate", {"text": "x", "return_logprob": True, "logprob_start_len": -2}, 400, "-2"),
        ("/generate", {"text": "x", "return_logprob": 1}, 400, "return_logprob"),
        ("/v1/completions", {"model": MODEL, "prompt": "x " * 9000}, 400, "8192"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "gpt-4"),
        ("/v1/completions", {"model": MODEL}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": "many"}, 400, "n"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "role",
        ),
        ("/generate", {"text": "x", "sampling_params": {"temprature": 1}}, 400, "temprature"),
        ("/generate", {"input_ids": [1, 99999999]}, 400, "99999999"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(server, route, body, status, needle) -> None:
    r = requests.post(f"{server.url}{route}", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert requests.get(f"{server.url}/health").status_code == 200


def test_malformed_json_is_a_400(server) -> None:
    r = requests.post(
        f"{server.url}/v1/completions",
        data="{not json",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "error" in r.json()


def test_a_disconnected_stream_is_aborted_and_frees_its_kv(server) -> None:
    body = {
        "text": "Tell me a long story.",
        "stream": True,
        "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True},
    }
    with requests.post(f"{server.url}/generate", json=body, stream=True) as r:
        lines = r.iter_lines()
        next(lines)
    kv = server.wait_idle(timeout=5)
    assert kv["protected"] == 0


def test_abort_request_by_id(server) -> None:
    import threading

    result = {}

    def run() -> None:
        body = {
            "text": "Tell me a long story.",
            "rid": "to-abort",
            "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True},
        }
        result["r"] = requests.post(f"{server.url}/generate", json=body).json()

    t = threading.Thread(target=run)
    t.start()
    for _ in range(100):
        if requests.post(f"{server.url}/abort_request", json={"rid": "to-abort"}).json()["success"]:
            break
        threading.Event().wait(0.1)
    t.join(30)
    assert result["r"]["meta_info"]["finish_reason"]["type"] == "abort"


def test_metrics_count_requests_tokens_latencies_and_cache(server) -> None:
    def scrape() -> dict[str, float]:
        text = requests.get(f"{server.url}/metrics").text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    label = f'{{model_name="{MODEL}"}}'
    before = scrape()
    body = {
        "text": "The capital of France is",
        "sampling_params": {"max_new_tokens": 5, "temperature": 0},
    }
    for _ in range(2):
        requests.post(f"{server.url}/generate", json=body).raise_for_status()
    after = scrape()

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert grew(f"lmprog_generation_tokens_total{label}") == 10
    assert grew(f"lmprog_prompt_tokens_total{label}") == 10
    assert grew(f"lmprog_time_to_first_token_seconds_count{label}") == 2
    assert grew(f"lmprog_e2e_request_latency_seconds_count{label}") == 2
    # every gap between two tokens is one observation: 4 per 5-token answer
    assert grew(f"lmprog_inter_token_latency_seconds_count{label}") == 8
    itl = grew(f"lmprog_inter_token_latency_seconds_sum{label}")
    assert 0 < itl < grew(f"lmprog_e2e_request_latency_seconds_sum{label}")
    assert grew(f"lmprog_prefix_cache_hit_tokens{label}") >= 4  # the second run hit the first
    assert after[f"lmprog_num_requests_running{label}"] == 0
    assert 0 <= after[f"lmprog_kv_cache_usage_ratio{label}"] <= 1


def test_max_new_tokens_0_caches_the_prompt_and_generates_nothing(server) -> None:
    assert requests.post(f"{server.url}/flush_cache").json()["success"]
    prefix = "You are a careful assistant. Answer in one word. Question: what colour is the sky?"
    r = requests.post(
        f"{server.url}/generate", json={"text": prefix, "sampling_params": {"max_new_tokens": 0}}
    )
    out = r.json()
    assert out["text"] == "" and out["output_ids"] == []
    meta = out["meta_info"]
    assert meta["completion_tokens"] == 0 and meta["finish_reason"] == {"type": "length"}
    n_prefix = meta["prompt_tokens"]
    ids = requests.post(f"{server.url}/tokenize", json={"text": prefix}).json()["tokens"]
    follow = requests.post(
        f"{server.url}/generate",
        json={"input_ids": [*ids, 28], "sampling_params": {"max_new_tokens": 1}},
    ).json()
    assert follow["meta_info"]["cached_tokens"] == n_prefix


# ---- prompt logprobs ------------------------------------------------------------------------
SKY = "Question: what colour is the sky on a clear day? Answer:"


def _offline_prompt_logprobs(llm, ids: list[int]) -> list[float | None]:
    """The offline engine's prompt logprobs (checked against HF in test_smollm2_vs_hf)."""
    from lmprog import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    out = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
    return [None] + [e[t].logprob for e, t in zip(out.prompt_logprobs[1:], ids[1:])]


def test_select_scores_choices_with_input_logprobs(server, llm) -> None:
    """SGLang's `select` over HTTP: cache the prefix, then score each choice from
    logprob_start_len = prefix tokens - 2, with token texts."""
    prefix = requests.post(
        f"{server.url}/generate", json={"text": SKY, "sampling_params": {"max_new_tokens": 0}}
    ).json()
    start = prefix["meta_info"]["prompt_tokens"] - 2
    choices = [" Blue", " Green", " Purple with spots"]
    scored = requests.post(
        f"{server.url}/generate",
        json={
            "text": [SKY + c for c in choices],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True,
            "logprob_start_len": start,
            "return_text_in_logprobs": True,
            "top_logprobs_num": 2,
        },
    ).json()
    for choice, item in zip(choices, scored):
        meta = item["meta_info"]
        ids = requests.post(f"{server.url}/tokenize", json={"text": SKY + choice}).json()["tokens"]
        entries = meta["input_token_logprobs"]
        assert [tid for _, tid, _ in entries] == ids[start:]
        assert (
            "".join(text for _, _, text in entries)
            == requests.post(f"{server.url}/detokenize", json={"tokens": ids[start:]}).json()[
                "text"
            ]
        )
        want = _offline_prompt_logprobs(llm, ids)[start:]
        assert [lp for lp, _, _ in entries] == pytest.approx(want, abs=1e-4)
        assert all(len(top) == 2 for top in meta["input_top_logprobs"])
        assert meta["output_token_logprobs"] == [] and item["output_ids"] == []
        # scored tokens were computed, not read from the prefix cache
        assert meta["cached_tokens"] <= start
    means = [sum(lp for lp, _, _ in it["meta_info"]["input_token_logprobs"]) for it in scored]
    assert means.index(max(means)) == 0  # " Blue" is the likeliest answer


def test_completions_echo_logprobs_score_the_prompt(client, llm) -> None:
    """lm-eval-harness' loglikelihood call: echo, logprobs and max_tokens 0."""
    r = client.completions.create(model=MODEL, prompt=SKY, max_tokens=0, echo=True, logprobs=1)
    choice = r.choices[0]
    assert choice.text == SKY and r.usage.completion_tokens == 0
    lp = choice.logprobs
    assert "".join(lp.tokens) == SKY
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    ids = llm.get_tokenizer().encode(SKY)
    assert lp.token_logprobs[1:] == pytest.approx(_offline_prompt_logprobs(llm, ids)[1:], abs=1e-4)
    # with generated tokens after the prompt; the stream carries the same tokens and text
    kw = {"model": MODEL, "prompt": SKY, "max_tokens": 3, "temperature": 0, "echo": True}
    full = client.completions.create(**kw, logprobs=1).choices[0]
    assert full.text.startswith(SKY) and len(full.logprobs.tokens) == len(ids) + 3
    chunks = [c.choices[0] for c in client.completions.create(**kw, logprobs=1, stream=True)]
    assert "".join(c.text for c in chunks) == full.text
    streamed = [t for c in chunks for t in c.logprobs.tokens]
    assert streamed == full.logprobs.tokens
    offsets = [o for c in chunks for o in c.logprobs.text_offset]
    assert offsets == full.logprobs.text_offset


def test_generate_beam_search_returns_the_n_best_beams(server) -> None:
    """The seeds' vLLM server call: `use_beam_search` with `n` beams, best first."""
    body = {"prompt": "San Francisco is a", "use_beam_search": True, "n": 4, "temperature": 0,
            "max_tokens": 6}  # fmt: skip
    beams = requests.post(f"{server.url}/generate", json=body).json()
    assert [b["meta_info"]["index"] for b in beams] == [0, 1, 2, 3]
    scores = [b["meta_info"]["cumulative_logprob"] for b in beams]
    assert (
        scores == sorted(scores, reverse=True) and len({tuple(b["output_ids"]) for b in beams}) == 4
    )
    greedy = requests.post(
        f"{server.url}/generate", json={"prompt": body["prompt"], "temperature": 0, "max_tokens": 6}
    ).json()
    assert scores[0] >= -1e-4 + _greedy_logprob(server, body["prompt"], greedy["output_ids"])
    for bad, param in (({"temperature": 0.5}, "temperature"), ({"n": 11}, "n"),
                       ({"stream": True}, "stream")):  # fmt: skip
        r = requests.post(f"{server.url}/generate", json=body | bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def _greedy_logprob(server, prompt: str, ids: list[int]) -> float:
    body = {"prompt": prompt, "temperature": 0, "max_tokens": len(ids), "return_logprob": True}
    out = requests.post(f"{server.url}/generate", json=body).json()
    assert out["output_ids"] == ids
    return sum(t[0] for t in out["meta_info"]["output_token_logprobs"])
