"""Hardening: no request can stall the server, bad input is a 400 naming the field and the
limit, errors have OpenAI's exact shape, and a fault in one request fails only that request."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import openai
import pytest
import requests
from conftest import FAULT_RID, Server, start_server

MODEL = "smollm2-135m-instruct"
CONTEXT = 8192  # SmolLM2's
VOCAB = 49152
STORY = {"text": "Tell me a long story.", "sampling_params": {"max_new_tokens": 4000}}
STORY["sampling_params"]["ignore_eos"] = True


@pytest.fixture(scope="module")
def tight() -> Server:
    """Two sequences run at once and one more may wait: 3 sequences in flight at most."""
    return start_server("--max-running-requests", "2", "--max-queued-requests", "1")


@contextmanager
def long_stream(server: Server, rid: str, n: int = 1) -> Iterator[dict]:
    """A long streamed /generate in flight (its first event arrived) until the block ends;
    then it is aborted. Yields what the client saw ({"events", "status"})."""
    seen: dict = {"events": 0, "status": None}
    first = threading.Event()
    body = STORY | {"rid": rid, "stream": True}
    body["sampling_params"] = STORY["sampling_params"] | {"n": n}

    def run() -> None:
        with requests.post(f"{server.url}/generate", json=body, stream=True, timeout=120) as r:
            seen["status"] = r.status_code
            for line in r.iter_lines():
                if line:
                    seen["events"] += 1
                    first.set()
        first.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert first.wait(60), "the long request never started"
    try:
        yield seen
    finally:
        requests.post(f"{server.url}/abort_request", json={"rid": rid}, timeout=30)
        thread.join(60)
        assert not thread.is_alive(), "an aborted stream did not end"


def error_of(r: requests.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


# ---- the server cannot be stalled ---------------------------------------------------------
def test_n_beyond_max_running_requests_is_a_400_and_the_server_keeps_serving(tight) -> None:
    body = {"text": "Hi", "sampling_params": {"max_new_tokens": 2, "n": 3}}
    error = error_of(requests.post(f"{tight.url}/generate", json=body), 400)
    assert error["param"] == "n" and "max_running_requests" in error["message"]
    assert "2" in error["message"] and "3" in error["message"]
    r = requests.post(f"{tight.url}/v1/completions", json={"prompt": "Hi", "n": 3, "max_tokens": 2})
    assert error_of(r, 400)["param"] == "n"
    ok = requests.post(f"{tight.url}/generate", json={"text": "Hi"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] >= 1


def test_the_queue_limit_holds_exactly_under_a_burst(tight) -> None:
    """10 simultaneous requests on a server taking 3 sequences: exactly 3 are admitted."""
    body = STORY | {"sampling_params": {"max_new_tokens": 48, "ignore_eos": True}}
    barrier = threading.Barrier(10)

    def send(_: int) -> int:
        barrier.wait()
        return requests.post(f"{tight.url}/generate", json=body, timeout=120).status_code

    with ThreadPoolExecutor(10) as pool:
        codes = sorted(pool.map(send, range(10)))
    assert codes == [200] * 3 + [503] * 7, codes


def test_the_queue_limit_counts_sequences_not_requests(tight) -> None:
    result = {}

    def queued() -> None:  # waits for a request slot, then runs
        r = requests.post(f"{tight.url}/generate", json={"text": "Hi"}, timeout=120)
        result["status"] = r.status_code

    thread = threading.Thread(target=queued)
    with long_stream(tight, "two-seqs", n=2):
        assert requests.get(f"{tight.url}/get_server_info").json()["sequences_in_flight"] == 2
        two = {"text": "Hi", "sampling_params": {"max_new_tokens": 2, "n": 2}}
        r = requests.post(f"{tight.url}/generate", json=two, timeout=60)
        assert error_of(r, 503)["type"] == "server_error" and r.headers["Retry-After"] == "1"
        thread.start()
        wait_for_in_flight(tight, 3)
    thread.join(60)
    assert result["status"] == 200


def wait_for_in_flight(server: Server, sequences: int) -> None:
    deadline = time.monotonic() + 30
    while requests.get(f"{server.url}/get_server_info").json()["sequences_in_flight"] < sequences:
        assert time.monotonic() < deadline, f"fewer than {sequences} sequences ever in flight"
        time.sleep(0.05)


def test_aborting_an_n_gt_1_request_before_its_prefill_ends_every_sequence(tight) -> None:
    """One of the two request slots is taken, so the n=2 request waits; aborting it must end
    both of its sequences (the handler used to wait for the second forever)."""
    result = {}

    def waiting() -> None:
        body = {"text": "Hi", "rid": "waiting-pair", "sampling_params": {"n": 2}}
        result["r"] = requests.post(f"{tight.url}/generate", json=body, timeout=60)

    with long_stream(tight, "slot-1"):
        thread = threading.Thread(target=waiting)
        thread.start()
        wait_for_in_flight(tight, 3)
        aborted = requests.post(f"{tight.url}/abort_request", json={"rid": "waiting-pair"})
        assert aborted.json()["success"]
        thread.join(30)
        assert not thread.is_alive(), "the handler of the aborted n=2 request hangs"
    items = result["r"].json()
    assert [i["meta_info"]["finish_reason"]["type"] for i in items] == ["abort", "abort"]
    assert sorted(i["meta_info"]["index"] for i in items) == [0, 1]


def test_a_duplicate_request_id_is_a_400(server) -> None:
    with long_stream(server, "same-id") as first:
        body = {"text": "Hi", "rid": "same-id", "sampling_params": {"max_new_tokens": 2}}
        error = error_of(requests.post(f"{server.url}/generate", json=body), 400)
        assert error["param"] == "rid" and "same-id" in error["message"]
        events = first["events"]
    assert events >= 1  # the first request kept streaming


def test_abort_all_ends_every_request(server) -> None:
    with long_stream(server, "all-1") as a, long_stream(server, "all-2") as b:
        r = requests.post(f"{server.url}/abort_request", json={"abort_all": True}).json()
        assert r["success"] and r["aborted"] == 2
    assert a["status"] == b["status"] == 200
    with long_stream(server, "all-3"):
        assert requests.post(f"{server.url}/abort_request", json={"rid": ""}).json()["aborted"]
    server.wait_idle()


def test_a_fault_in_one_request_fails_it_with_a_500_and_the_rest_finish(server) -> None:
    """The scheduler's test hook makes the step of any request whose rid contains FAULT_RID
    raise; the others in the same batches finish, and the KV balances (autouse check)."""

    def send(rid: str, n: int = 1) -> requests.Response:
        body = {"text": f"Count to ten ({rid}):", "rid": rid}
        body["sampling_params"] = {"max_new_tokens": 8, "ignore_eos": True, "n": n}
        return requests.post(f"{server.url}/generate", json=body, timeout=60)

    rids = ["ok-0", f"{FAULT_RID}-a", "ok-1", f"{FAULT_RID}-pair", "ok-2"]
    with ThreadPoolExecutor(5) as pool:
        futures = {rid: pool.submit(send, rid, 2 if "pair" in rid else 1) for rid in rids}
        responses = {rid: f.result() for rid, f in futures.items()}
    for rid, r in responses.items():
        if FAULT_RID in rid:
            error = error_of(r, 500)
            assert error["type"] == "server_error" and "fault injected" in error["message"]
        else:
            assert r.status_code == 200, r.text
            assert r.json()["meta_info"]["completion_tokens"] == 8
    body = {"text": "Hi", "rid": f"{FAULT_RID}-stream", "stream": True}
    with requests.post(f"{server.url}/generate", json=body, stream=True, timeout=60) as r:
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == b"data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["type"] == "server_error"
    stream = requests.post(
        f"{server.url}/v1/completions",
        json={"prompt": "Hi", "max_tokens": 4, "stream": True},
        timeout=60,
    )
    assert stream.status_code == 200 and "[DONE]" in stream.text
    assert requests.get(f"{server.url}/health_generate", timeout=30).status_code == 200


def test_health_answers_while_a_long_text_is_tokenized(server) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 45_000  # ~2 MB, ~450k tokens
    done = threading.Event()
    took = {}

    def tokenize() -> None:
        start = time.monotonic()
        r = requests.post(f"{server.url}/tokenize", json={"text": text}, timeout=120)
        took["s"], took["count"] = time.monotonic() - start, r.json()["count"]
        done.set()

    thread = threading.Thread(target=tokenize)
    thread.start()
    lags = []
    while not done.is_set():
        start = time.monotonic()
        assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
        lags.append(time.monotonic() - start)
        time.sleep(0.05)
    thread.join()
    assert took["count"] > 400_000
    assert took["s"] > 1.0, "too quick to show anything"
    assert len(lags) >= 5 and max(lags) < 0.5, (max(lags), took)


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(server) -> None:
    text = "word " * 3_000_000  # 15 MB: tokenizing it would take about 20 s here
    start = time.monotonic()
    r = requests.post(f"{server.url}/v1/completions", json={"prompt": text}, timeout=60)
    error = error_of(r, 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert time.monotonic() - start < 5
    assert str(CONTEXT) in error["message"]


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", {"prompt": [-1]}, "prompt"),
        ("/v1/completions", {"prompt": [[5, 6], [7, VOCAB]]}, "prompt"),
        ("/generate", {"input_ids": [-1]}, "input_ids"),
        ("/generate", {"input_ids": [[1, 2], [VOCAB + 5]]}, "input_ids"),
    ],
)
def test_token_ids_outside_the_vocabulary_are_a_400(server, route, body, param) -> None:
    error = error_of(requests.post(f"{server.url}{route}", json=body), 400)
    assert error["param"] == param and str(VOCAB) in error["message"]
    assert "outside the vocabulary" in error["message"]


def test_prompt_plus_max_tokens_beyond_the_context_is_a_400(server) -> None:
    body = {"prompt": [42] * (CONTEXT - 5), "max_tokens": 100}
    error = error_of(requests.post(f"{server.url}/v1/completions", json=body), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert str(CONTEXT) in error["message"] and str(CONTEXT + 95) in error["message"]
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": CONTEXT}
    error = error_of(requests.post(f"{server.url}/v1/chat/completions", json=chat), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    native = {"input_ids": [42] * (CONTEXT - 5), "sampling_params": {"max_new_tokens": 100}}
    error = error_of(requests.post(f"{server.url}/generate", json=native), 400)
    assert error["code"] == "context_length_exceeded"
    # Omitted, max_tokens means "up to the context": still accepted.
    ok = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": None}
    ok_r = requests.post(f"{server.url}/v1/chat/completions", json=ok | {"stop": ["\n", "."]})
    assert ok_r.status_code == 200, ok_r.text


def test_max_tokens_0_needs_echo(server) -> None:
    body = {"prompt": "Hi", "max_tokens": 0}
    error = error_of(requests.post(f"{server.url}/v1/completions", json=body), 400)
    assert error["param"] == "max_tokens" and "echo" in error["message"]
    scored = requests.post(f"{server.url}/v1/completions", json=body | {"echo": True})
    assert scored.status_code == 200


def test_best_of_only_as_n(server) -> None:
    body = {"prompt": "Hi", "max_tokens": 2}
    error = error_of(requests.post(f"{server.url}/v1/completions", json=body | {"best_of": 3}), 400)
    assert error["param"] == "best_of" and "not supported" in error["message"]
    for extra in ({"best_of": 1}, {"best_of": 2, "n": 2}):
        r = requests.post(f"{server.url}/v1/completions", json=body | extra)
        assert r.status_code == 200 and len(r.json()["choices"]) == extra.get("n", 1)


# ---- OpenAI's error shape -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("route", "body", "status", "param", "code"),
    [
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, None, "model_not_found"),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", None),
        ("/v1/completions", {"prompt": "x", "top_p": 2}, 400, "top_p", None),
        ("/v1/chat/completions", {"messages": [{"role": "user"}], "n": 0}, 400, "n", None),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -2},
            400,
            "max_completion_tokens",
            None,
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "wizard", "content": "x"}]},
            400,
            "messages.[0].role",
            None,
        ),
        (
            "/generate",
            {"text": "x", "sampling_params": {"max_new_tokens": -1}},
            400,
            "sampling_params.max_new_tokens",
            None,
        ),
        ("/v1/nowhere", {}, 404, None, None),
    ],
)
def test_errors_have_openais_type_param_and_code(server, route, body, status, param, code) -> None:
    error = error_of(requests.post(f"{server.url}{route}", json=body), status)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code, error


def test_truncated_json_has_no_param(server) -> None:
    r = requests.post(
        f"{server.url}/v1/completions",
        data='{"prompt": "x", "max_tok',
        headers={"Content-Type": "application/json"},
    )
    error = error_of(r, 400)
    assert error["param"] is None and error["code"] is None and "JSON" in error["message"]


def test_the_openai_client_sees_the_codes(server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert e.value.code == "model_not_found"
    # SGLang's examples name the served model "default".
    alias = client.completions.create(model="default", prompt="x", max_tokens=1)
    assert alias.model == MODEL
    long_chat = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=long_chat, max_tokens=CONTEXT)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"


# ---- SGLang's native names ------------------------------------------------------------------
def test_server_info_has_sglangs_kv_names(server) -> None:
    info = requests.get(f"{server.url}/get_server_info").json()
    kv = info["kv_cache"]
    assert info["max_total_num_tokens"] == kv["total"]
    assert info["available_size"] + info["evictable_size"] + info["protected_size"] == kv["total"]
    assert info["req_pool_size"] == info["req_pool_free"] == 256


def test_streamed_logprob_text_matches_the_whole(server) -> None:
    body = {
        "text": "The capital of Germany is",
        "return_logprob": True,
        "top_logprobs_num": 2,
        "return_text_in_logprobs": True,
        "sampling_params": {"max_new_tokens": 6, "temperature": 0},
    }
    whole = requests.post(f"{server.url}/generate", json=body).json()["meta_info"]
    r = requests.post(f"{server.url}/generate", json=body | {"stream": True}, stream=True)

    events = [json.loads(line[6:]) for line in r.iter_lines() if line and line != b"data: [DONE]"]
    streamed, expected = events[-1]["meta_info"], whole
    for name in ("output_token_logprobs", "output_top_logprobs"):
        flat = [
            t for row in streamed[name] for t in (row if name.endswith("top_logprobs") else [row])
        ]
        want = [
            t for row in expected[name] for t in (row if name.endswith("top_logprobs") else [row])
        ]
        assert [t[1:] for t in flat] == [t[1:] for t in want]
        assert all(t[2] for t in flat)  # every token has its text
        assert all(abs(a[0] - b[0]) < 1e-3 for a, b in zip(flat, want))
