"""The server at tp 2 (gloo on CPU): it answers as the one-rank engine does, on one machine and
as two "nodes" on localhost (`--nnodes 2 --node-rank 0/1 --dist-init-addr`), and losing a rank
ends it with the reason in its log instead of leaving it hung."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT, Server, free_port
from tp_models import save_tp_model, words

from lmprog import SamplingParams

PROMPT = words([5, 17, 33, 8, 91, 40, 12])
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tp_model("llama_kv2_bias", str(tmp_path_factory.mktemp("tp_server"))))


@pytest.fixture(scope="module")
def expected(folder: str, engine_factory) -> str:
    """The one-rank offline engine's greedy continuation."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    (out,) = engine_factory(model=folder).generate([PROMPT], params, use_tqdm=False)
    return out.outputs[0].text


def complete(server: Server) -> requests.Response:
    body = {
        "model": server.model,
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    return requests.post(f"{server.url}/v1/completions", json=body, timeout=60)


def spawned_children(pid: int) -> list[int]:
    """The multiprocessing children of `pid` (its tensor-parallel ranks)."""
    out = subprocess.run(
        ["pgrep", "-P", str(pid), "-f", "spawn_main"], capture_output=True, text=True, check=False
    )
    return [int(p) for p in out.stdout.split()]


def wait_exit(proc: subprocess.Popen, timeout: float = 30) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {timeout}s after losing a rank (hung)")


def test_one_machine_two_ranks(folder: str, expected: str) -> None:
    server = Server("--model-path", folder, "--tp-size", "2", "--disable-dashboard")
    server.model = folder
    try:
        reply = complete(server)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected
        assert requests.get(f"{server.url}/dashboard").status_code == 404  # --disable-dashboard
        (rank1,) = spawned_children(server.scheduler_pid())
        os.kill(rank1, signal.SIGKILL)
        assert wait_exit(server.proc) != 0
        assert "tensor-parallel rank 1" in server.logs()
        assert "exited with code -9" in server.logs()
    finally:
        server.stop()


def test_two_nodes_on_localhost(folder: str, expected: str, tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    dist = ["--tp-size", "2", "--nnodes", "2", "--dist-init-addr", addr, "--dtype", "float32"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), HF_HUB_OFFLINE="1")
    with open(tmp_path / "node1.log", "w") as log:
        node1 = subprocess.Popen(
            [sys.executable, "-m", "lmprog.launch_server", "--model-path", folder, *dist,
             "--node-rank", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    server = None
    try:
        server = Server("--model-path", folder, *dist, "--node-rank", "0")
        server.model = folder
        reply = complete(server)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected
        # The second machine goes down: its rank and its launcher.
        for pid in [*spawned_children(node1.pid), node1.pid]:
            os.kill(pid, signal.SIGKILL)
        node1.wait(10)
        time.sleep(0.5)  # let the sockets close
        try:
            reply = complete(server)
            assert reply.status_code >= 500, reply.text
        except requests.ConnectionError:
            pass  # the server may be gone before it answers
        assert wait_exit(server.proc) != 0
        assert "a rank of 2 is gone" in server.logs()
        assert "the server cannot go on" in server.logs()
    finally:
        if server is not None:
            server.stop()
        if node1.poll() is None:
            node1.kill()
