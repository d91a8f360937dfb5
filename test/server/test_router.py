"""The router (`python -m lmprog.router`) in front of two real servers: routes pass through,
the policies place requests as they say, and a dead worker leaves and comes back.

The two workers are small (`--max-total-tokens 4096 --cpu-threads 1`) and shared by every test
here; the routers are cheap (no model) and one runs per policy. The dead-worker test kills
worker 1 and restarts it on its port, so it runs last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
from conftest import _SERVERS, ROOT, START_TIMEOUT, Server, free_port, start_server

MODEL = "smollm2-135m-instruct"
WORKER_FLAGS = ("--max-total-tokens", "4096", "--cpu-threads", "1")
GERMANY = [{"role": "user", "content": "What is the capital of Germany?"}]


class Router:
    """`python -m lmprog.router` on a free port, over `worker_urls`; `url` once it answers."""

    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), HF_HUB_OFFLINE="1")
        self.log = open(f"/tmp/lmprog-test-router-{self.port}.log", "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "lmprog.router", "--port", str(self.port), *flags]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"router did not start: {Path(self.log.name).read_text()}")
            time.sleep(0.2)  # polling a subprocess: nothing to wait on instead

    def _answers(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def workers(self) -> list[dict]:
        return requests.get(f"{self.url}/workers", timeout=10).json()["workers"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def workers() -> Iterator[list[Server]]:
    """Two small servers, loaded at once; stopped with this module (each must exit 0)."""
    with ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda _: start_server(*WORKER_FLAGS), range(2)))
    yield servers  # the dead-worker test replaces servers[1]
    for server in servers:
        _SERVERS.remove(server)
    assert [server.stop() for server in servers] == [0, 0]


def _router_fixture(policy: str):
    @pytest.fixture(scope="module")
    def fixture(workers: list[Server]) -> Iterator[Router]:
        urls = [w.url for w in workers]
        router = Router(
            "--worker-urls", *urls, "--policy", policy, "--health-check-interval", "0.5"
        )
        yield router
        assert router.stop() == 0

    return fixture


rr_router = _router_fixture("round_robin")
ca_router = _router_fixture("cache_aware")


def counters(server: Server) -> dict:
    return requests.get(f"{server.url}/get_server_info", timeout=30).json()["scheduler"]


def served_by(response: requests.Response) -> str:
    return response.headers["X-Lmprog-Worker"]


def sse_events(response: requests.Response) -> list:
    return [
        line[len("data: ") :]
        for line in response.iter_lines(decode_unicode=True)
        if line.startswith("data: ")
    ]


# ---- routes pass through --------------------------------------------------------------------
def test_native_generate_and_its_stream_pass_through(rr_router, workers) -> None:
    body = {"text": "1, 2, 3, 4,", "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
    direct = requests.post(f"{workers[0].url}/generate", json=body, timeout=60).json()
    routed = requests.post(f"{rr_router.url}/generate", json=body, timeout=60)
    assert routed.status_code == 200
    assert routed.json()["text"] == direct["text"] and " 5" in direct["text"]
    with requests.post(
        f"{rr_router.url}/generate", json=body | {"stream": True}, stream=True, timeout=60
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]" and len(events) >= 3  # relayed piece by piece
    assert json.loads(events[-2])["text"] == direct["text"]


def test_a_client_that_leaves_mid_stream_frees_its_worker(rr_router, workers) -> None:
    body = {"text": "Count: 1, 2,", "stream": True}
    body["sampling_params"] = {"max_new_tokens": 400, "ignore_eos": True}
    with requests.post(f"{rr_router.url}/generate", json=body, stream=True, timeout=60) as r:
        lines = r.iter_lines(decode_unicode=True)
        assert next(line for line in lines if line.startswith("data: "))
        worker = next(w for w in workers if w.url == served_by(r))
    # The router closes the worker's stream, the worker aborts the request (long before its 400
    # tokens), and the router's count of requests in flight goes back to 0.
    assert worker.wait_idle(timeout=10)["running_requests"] == 0
    deadline = time.monotonic() + 10
    while any(w["load"] for w in rr_router.workers()):
        assert time.monotonic() < deadline, rr_router.workers()
        time.sleep(0.05)


def test_openai_client_through_the_router(rr_router, workers) -> None:
    client = openai.OpenAI(base_url=f"{rr_router.url}/v1", api_key="none")
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(
        model=model, messages=GERMANY, max_tokens=12, temperature=0
    )
    assert "Berlin" in chat.choices[0].message.content
    pieces = client.chat.completions.create(
        model=model, messages=GERMANY, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(p.choices[0].delta.content or "" for p in pieces if p.choices) == (
        chat.choices[0].message.content
    )
    completion = client.completions.create(
        model=model, prompt="1, 2, 3, 4,", max_tokens=4, temperature=0
    )
    assert " 5" in completion.choices[0].text
    with pytest.raises(openai.BadRequestError, match="temperature"):  # errors pass through too
        client.completions.create(model=model, prompt="x", max_tokens=4, temperature=-1)


# ---- policies -------------------------------------------------------------------------------
def test_round_robin_alternates_between_the_workers(rr_router, workers) -> None:
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 2}}
    order = [
        served_by(requests.post(f"{rr_router.url}/generate", json=body, timeout=60))
        for _ in range(4)
    ]
    assert set(order) == {w.url for w in workers}
    assert order[0] != order[1] and order[:2] == order[2:]


def test_cache_aware_keeps_each_conversation_on_one_worker(ca_router, workers) -> None:
    openings = {
        "volcano": "Tell me one fact about volcanoes, in a short sentence please.",
        "piano": "Give me a single tip for someone who is learning to play the piano.",
    }
    histories = {name: [{"role": "user", "content": text}] for name, text in openings.items()}
    owners: dict[str, set[str]] = {name: set() for name in openings}
    before = {w.url: counters(w) for w in workers}
    # Turns in an uneven order: alternating ones would stay put under round robin too.
    for turn, name in enumerate(["volcano", "piano", "piano", "volcano", "volcano", "piano"]):
        messages = histories[name]
        r = requests.post(
            f"{ca_router.url}/v1/chat/completions",
            json={"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        owners[name].add(served_by(r))
        messages.append(r.json()["choices"][0]["message"])
        messages.append({"role": "user", "content": f"And what else? ({turn})"})
    assert all(len(urls) == 1 for urls in owners.values()), owners
    assert owners["volcano"] != owners["piano"]  # two new conversations spread out
    for w in workers:  # each worker found its conversation's earlier turns in its cache
        after = counters(w)
        queried = after["cache_query_tokens"] - before[w.url]["cache_query_tokens"]
        hit = after["cache_hit_tokens"] - before[w.url]["cache_hit_tokens"]
        assert queried > 0 and hit > 0.6 * queried, (w.url, queried, hit)
        print("HITS", queried, hit)


def test_router_workers_list_and_remove_add(ca_router, workers) -> None:
    listed = ca_router.workers()
    assert [w["url"] for w in listed] == [w.url for w in workers]
    assert all(w["healthy"] and w["load"] == 0 for w in listed)
    gone = requests.post(f"{ca_router.url}/remove_worker", params={"url": workers[1].url})
    assert gone.json() == {"success": True}
    again = requests.post(f"{ca_router.url}/remove_worker", params={"url": workers[1].url})
    assert again.status_code == 404 and "no worker" in again.json()["error"]["message"]
    body = {"text": "Hi", "sampling_params": {"max_new_tokens": 2}}
    for _ in range(2):
        r = requests.post(f"{ca_router.url}/generate", json=body, timeout=60)
        assert served_by(r) == workers[0].url
    added = requests.post(f"{ca_router.url}/add_worker", params={"url": workers[1].url}).json()
    assert added["worker"]["healthy"] is True
    assert len(ca_router.workers()) == 2


# ---- --dp-size --------------------------------------------------------------------------------
def test_launch_server_dp_size_serves_replicas_behind_one_front() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "lmprog.launch_server", "--dp-size", "2", "--port", str(port)]
    cmd += ["--max-total-tokens", "2048", "--dtype", "float32"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), HF_HUB_OFFLINE="1")
    with open(f"/tmp/lmprog-test-dp-{port}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert proc.poll() is None, Path(log.name).read_text()
            assert time.monotonic() < deadline, Path(log.name).read_text()
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.3)  # polling a subprocess: nothing to wait on instead
        replicas = requests.get(f"{url}/workers", timeout=10).json()["workers"]
        assert len(replicas) == 2 and all(r["healthy"] for r in replicas)
        threads = len(os.sched_getaffinity(0)) // 2 or 1
        for r in replicas:
            info = requests.get(f"{r['url']}/get_server_info", timeout=30).json()
            assert info["server_args"]["cpu_threads"] == threads
            assert info["max_total_tokens"] == 2048  # the flags reached every replica
        chat = requests.post(
            f"{url}/v1/chat/completions",
            json={"model": MODEL, "messages": GERMANY, "max_tokens": 12, "temperature": 0},
            timeout=60,
        )
        assert "Berlin" in chat.json()["choices"][0]["message"]["content"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(90)
    assert code == 0, Path(log.name).read_text()
    for r in replicas:  # the replicas went with it
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{r['url']}/health", timeout=2)


# ---- a dead worker (last: it restarts worker 1) ---------------------------------------------
def kill(server: Server) -> None:
    """SIGKILL to the server and its scheduler, as a crashed host: no draining, no goodbye."""
    scheduler = server.scheduler_pid()
    server.proc.send_signal(signal.SIGKILL)
    os.kill(scheduler, signal.SIGKILL)
    server.proc.wait()
    server.log.close()
    _SERVERS.remove(server)  # it cannot exit 0 any more


def test_a_dead_worker_is_removed_and_readded_when_back(rr_router, workers) -> None:
    dead = workers[1]
    solo = Router("--worker-urls", dead.url)  # its requests all go to the worker we kill
    long = {"text": "Count: 1, 2,", "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    stream = requests.post(f"{solo.url}/generate", json=long | {"stream": True}, stream=True)
    lines = stream.iter_lines(decode_unicode=True)
    assert next(line for line in lines if line.startswith("data: "))  # it is generating
    with ThreadPoolExecutor(1) as pool:
        whole = pool.submit(requests.post, f"{solo.url}/generate", json=long, timeout=60)
        deadline = time.monotonic() + 10
        while dead.kv()["running_requests"] < 2:  # both are running on the worker
            assert time.monotonic() < deadline, dead.kv()
            time.sleep(0.05)
        kill(dead)
        failed = whole.result()
    assert failed.status_code == 502, failed.text
    assert dead.url in failed.json()["error"]["message"]
    last = [line for line in lines if line.startswith("data: ")][-1]
    error = json.loads(last[len("data: ") :])["error"]  # the stream ends with the failure
    assert error["type"] == "server_error" and dead.url in error["message"]
    refused = requests.post(f"{solo.url}/generate", json=long, timeout=60)
    assert refused.status_code == 503 and "no healthy worker" in refused.json()["error"]["message"]
    assert solo.stop() == 0

    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 2}}
    for _ in range(4):  # the first to pick it is retried on worker 0; then it is out
        r = requests.post(f"{rr_router.url}/generate", json=body, timeout=60)
        assert r.status_code == 200 and served_by(r) == workers[0].url
    assert [w["healthy"] for w in rr_router.workers()] == [True, False]

    workers[1] = start_server(*WORKER_FLAGS, port=dead.port)
    deadline = time.monotonic() + 10
    while not all(w["healthy"] for w in rr_router.workers()):
        assert time.monotonic() < deadline, rr_router.workers()
        time.sleep(0.2)  # the router's health check runs every 0.5 s
    order = {
        served_by(requests.post(f"{rr_router.url}/generate", json=body, timeout=60))
        for _ in range(2)
    }
    assert order == {workers[0].url, workers[1].url}
