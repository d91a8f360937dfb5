"""The real server as a subprocess, one per configuration for the whole run, and after every
test a check that it is idle with its KV accounting balanced."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m lmprog.launch_server` on a free port; `url` once it answers.

    `--dtype float32` unless the flags say otherwise, as for the offline engines (conftest.py)."""

    def __init__(
        self, *flags: str, env: dict[str, str] | None = None, port: int | None = None
    ) -> None:
        if "--dtype" not in flags:
            flags = (*flags, "--dtype", "float32")
        self.port = port or free_port()
        key = flags[flags.index("--api-key") + 1] if "--api-key" in flags else None
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), HF_HUB_OFFLINE="1", **(env or {}))
        self.log = open(f"/tmp/lmprog-test-server-{self.port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmprog.launch_server", "--port", str(self.port), *flags],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.logs()}")
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not start in {START_TIMEOUT}s: {self.logs()}")

    def logs(self) -> str:
        return Path(self.log.name).read_text()[-3000:]

    def scheduler_pid(self) -> int:
        """The scheduler process (not multiprocessing's resource tracker)."""
        pgrep = ["pgrep", "-P", str(self.proc.pid), "-f", "spawn_main"]
        out = subprocess.run(pgrep, capture_output=True, text=True, check=False)
        (pid,) = [int(p) for p in out.stdout.split()]
        return pid

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def kv(self) -> dict:
        info = requests.get(f"{self.url}/get_server_info", headers=self.headers, timeout=30)
        return info.json()["kv_cache"]

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """The KV stats once nothing runs (a disconnected request may take a step to end)."""
        deadline = time.monotonic() + timeout
        while True:
            kv = self.kv()
            if kv["running_requests"] == 0 and kv["waiting_requests"] == 0:
                return kv
            if time.monotonic() > deadline:
                raise AssertionError(f"requests still running after {timeout}s: {kv}")
            time.sleep(0.2)


_SERVERS: list[Server] = []


def start_server(*flags: str, env: dict[str, str] | None = None, port: int | None = None) -> Server:
    server = Server(*flags, env=env, port=port)
    _SERVERS.append(server)
    return server


@pytest.fixture(scope="session", autouse=True)
def _stop_servers() -> Iterator[None]:
    """Every server ends with the session: SIGTERM, and it must exit 0."""
    yield
    codes = {s.url: s.stop() for s in _SERVERS}
    assert all(code == 0 for code in codes.values()), codes


FAULT_RID = "inject-fault"  # requests whose rid contains this fail in their step


@pytest.fixture(scope="session")
def server() -> Server:
    """The default server: the embedded model, no API key; the test hook that fails the
    requests whose rid contains FAULT_RID is on (no other test uses such ids). It reads hermes
    tool calls and qwen3 thinking, which changes nothing for requests without tools whose
    replies do not start with <think>."""
    return start_server(
        "--tool-call-parser",
        "hermes",
        "--reasoning-parser",
        "qwen3",
        env={"LMPROG_FAULT_INJECT_RID": FAULT_RID},
    )


@pytest.fixture(autouse=True)
def _servers_balanced() -> Iterator[None]:
    yield
    for s in _SERVERS:
        if s.proc.poll() is None:
            kv = s.wait_idle()
            assert kv["free"] + kv["evictable"] + kv["protected"] == kv["total"], kv
            assert kv["protected"] == 0 and kv["locked_nodes"] == 0, kv
