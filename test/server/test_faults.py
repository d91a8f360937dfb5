"""Faults: the API key, oversized bodies, a full queue, SIGTERM while busy, a dead scheduler."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests
from conftest import Server, start_server

MODEL = "smollm2-135m-instruct"
LONG = {
    "text": "Tell me a long story.",
    "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True},
}


@pytest.fixture(scope="module")
def guarded() -> Server:
    """API key, a 2 KB body limit, one running request and no queue."""
    return start_server(
        "--api-key",
        "s3cret",
        "--max-request-bytes",
        "2048",
        "--max-running-requests",
        "1",
        "--max-queued-requests",
        "0",
    )


def test_api_key_guards_v1_and_control_routes_but_not_health(guarded) -> None:
    url = guarded.url
    assert requests.get(f"{url}/health").status_code == 200
    for method, route in [("get", "/v1/models"), ("post", "/generate"), ("post", "/flush_cache")]:
        r = getattr(requests, method)(f"{url}{route}", json={})
        assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
        wrong = getattr(requests, method)(
            f"{url}{route}", json={}, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401 and "wrong" in wrong.json()["error"]["message"]
    ok = requests.get(f"{url}/v1/models", headers=guarded.headers)
    assert ok.status_code == 200


def test_an_oversized_body_is_a_413(guarded) -> None:
    body = {"model": MODEL, "prompt": "x" * 5000}
    r = requests.post(f"{guarded.url}/v1/completions", json=body, headers=guarded.headers)
    assert r.status_code == 413 and "2048" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit still holds
        yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
        yield b"y" * 4000
        yield b'"}'

    r = requests.post(
        f"{guarded.url}/v1/completions",
        data=chunks(),
        headers=guarded.headers | {"Content-Type": "application/json"},
    )
    assert r.status_code == 413


def test_a_full_queue_is_a_503_with_retry_after(guarded) -> None:
    started, stop = threading.Event(), threading.Event()

    def consume() -> None:  # a client reading its long stream until told to leave
        body = LONG | {"stream": True}
        with requests.post(
            f"{guarded.url}/generate", json=body, headers=guarded.headers, stream=True
        ) as r:
            for line in r.iter_lines():
                started.set()
                if stop.is_set():
                    return

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(30)
    r = requests.post(f"{guarded.url}/generate", json={"text": "hi"}, headers=guarded.headers)
    stop.set()
    reader.join(30)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
    assert "max_queued_requests" in r.json()["error"]["message"]
    guarded.wait_idle()
    r = requests.post(f"{guarded.url}/generate", json={"text": "hi"}, headers=guarded.headers)
    assert r.status_code == 200


def test_sigterm_drains_in_flight_requests_and_exits_0() -> None:
    server = Server()
    result = {}

    def run() -> None:
        body = {
            "text": "Count to fifty:",
            "sampling_params": {"max_new_tokens": 48, "ignore_eos": True},
        }
        result["r"] = requests.post(f"{server.url}/generate", json=body, timeout=120)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 30
    while server.kv()["running_requests"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.stop() == 0  # SIGTERM
    t.join(60)
    assert result["r"].status_code == 200
    assert result["r"].json()["meta_info"]["completion_tokens"] == 48


def test_a_dead_scheduler_makes_the_server_exit_nonzero() -> None:
    server = Server()
    os.kill(server.scheduler_pid(), signal.SIGKILL)
    try:
        server.proc.wait(20)
    finally:
        code = server.stop()
    assert code not in (0, None), server.logs()
    assert "scheduler process died" in server.logs()


def test_an_unloadable_model_fails_at_startup_with_a_clear_message() -> None:
    import subprocess
    import sys

    from conftest import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-m", "lmprog.launch_server", "--model-path", "org/no-such-model"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert run.returncode == 1
    assert "cannot load the model" in run.stderr and "org/no-such-model" in run.stderr
    assert "ready" not in run.stdout
