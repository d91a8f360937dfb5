"""Local replicas for data parallelism: N `python -m lmprog.launch_server` processes on this host.

Each replica gets its own port on 127.0.0.1 and, on CPU, its share of the cores
(`--cpu-threads cores // N`, unless the flags set it): replicas that each took every core would
fight over them. They run until `stop()` (SIGTERM: each drains and exits 0); on Linux they also get
SIGTERM if the process that started them dies without stopping them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO

from lmprog.router.http import httpx

PR_SET_PDEATHSIG = 1  # prctl option, linux/prctl.h
OWN_FLAGS = ("--dp-size", "--host", "--port")  # the router's, not a replica's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_flags(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """`argv` without the flags `names` and their values (`--port 1` and `--port=1` forms)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif arg.split("=", 1)[0] not in names:
            out.append(arg)
    return out


def replica_flags(server_flags: Sequence[str], dp_size: int, port: int) -> list[str]:
    flags = [*strip_flags(server_flags, OWN_FLAGS), "--host", "127.0.0.1", "--port", str(port)]
    if not any(f.split("=", 1)[0] == "--cpu-threads" for f in flags):
        threads = max(1, len(os.sched_getaffinity(0)) // dp_size)
        flags += ["--cpu-threads", str(threads)]
    return flags


def _end_with_parent() -> None:
    """In the child: SIGTERM when the router dies, even by SIGKILL (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Replicas:
    def __init__(self, server_flags: Sequence[str], dp_size: int, log: IO | None = None) -> None:
        """Starts them; their output goes to `log` (default: this process's stdout/stderr)."""
        assert dp_size >= 1, f"dp_size must be >= 1, got {dp_size}"
        self.procs: list[subprocess.Popen] = []
        self.urls: list[str] = []
        for _ in range(dp_size):
            port = free_port()
            cmd = [sys.executable, "-m", "lmprog.launch_server"]
            flags = replica_flags(server_flags, dp_size, port)
            proc = subprocess.Popen(
                cmd + flags,
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
                preexec_fn=_end_with_parent,  # noqa: PLW1509 (started before any thread)
            )
            self.procs.append(proc)
            self.urls.append(f"http://127.0.0.1:{port}")

    def wait_ready(self, timeout: float) -> None:
        """Returns once every replica answers GET /health with 200; raises if one exits first."""
        deadline = time.monotonic() + timeout
        pending = dict(zip(self.urls, self.procs))
        while pending:
            for url, proc in list(pending.items()):
                if proc.poll() is not None:
                    raise RuntimeError(f"replica {url} exited with code {proc.returncode}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        del pending[url]
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas {sorted(pending)} not ready after {timeout:.0f} s")
            if pending:
                time.sleep(0.5)  # polling processes that offer nothing to wait on

    def stop(self) -> list[int]:
        """SIGTERM to each (they drain their requests), then their exit codes."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(60))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return codes
