"""A `python -m lmprog.launch_server` subprocess for benchmarks that need a real server.

    with serve(["--model-path", "all-minilm-l6-v2"], timeout=300, label="embeddings") as url:
        ...                       # the server answers GET /health with 200 here

On exit it gets SIGTERM and must end with code 0 (the script fails otherwise, keeping the log).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(flags: list[str], timeout: float, label: str, port: int | None = None) -> Iterator[str]:
    """Starts the server with `flags` on `port` (default: a free one); yields its base URL."""
    port = port or free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "lmprog.launch_server", *flags, "--port", str(port)]
    fd, log_path = tempfile.mkstemp(prefix=f"bench-{label}-server-", suffix=".log")
    with os.fdopen(fd, "w") as log:  # the child holds its own copy of the descriptor
        # Its own session: a Ctrl-C here reaches only this script, which then stops the server;
        # and a last-resort SIGKILL to the group also ends the scheduler process it spawned.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(proc, base_url, timeout, log_path)
        yield base_url
    finally:
        code = _stop(proc)
    if code != 0:
        sys.exit(f"FAIL: the server exited with code {code} after SIGTERM; its log: {log_path}")
    os.unlink(log_path)


def _wait_ready(proc: subprocess.Popen, base_url: str, timeout: float, log_path: str) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}; log: {log_path}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{base_url}/health", timeout=2).status_code == 200:
                print(f"server start (until /health is 200): {time.perf_counter() - t0:.2f} s")
                return
        time.sleep(0.2)  # polling a subprocess we do not control: nothing to wait on instead
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s; log: {log_path}")


def _stop(proc: subprocess.Popen) -> int:
    """SIGTERM, then wait; SIGKILL to the whole group if it does not exit. Returns its code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode
