"""Runtime: starts an lmprog server in a subprocess and serves programs through it.

    runtime = Runtime(model_path="smollm2-135m-instruct")
    set_default_backend(runtime)
    ...
    runtime.shutdown()          # also done at interpreter exit

Keyword arguments are the server's flags (ServerArgs names: `max_total_tokens=4096` becomes
`--max-total-tokens 4096`; `True` turns a switch on).
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import requests

from lmprog.lang.backend.runtime_endpoint import RuntimeEndpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runtime:
    def __init__(
        self, model_path: str | None = None, launch_timeout: float = 300.0, **server_args: Any
    ) -> None:
        port = server_args.pop("port", None) or _free_port()
        host = server_args.pop("host", "127.0.0.1")
        flags = ["--host", host, "--port", str(port)]
        if model_path is not None:
            flags += ["--model-path", model_path]
        for name, value in server_args.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                flags.append(flag)
            elif value not in (None, False):
                flags += [flag, str(value)]
        self.url = f"http://{host}:{port}"
        self._log = tempfile.NamedTemporaryFile("w+", prefix="lmprog-runtime-", suffix=".log")  # noqa: SIM115
        self._proc: subprocess.Popen | None = subprocess.Popen(
            [sys.executable, "-m", "lmprog.launch_server", *flags],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
        atexit.register(self.shutdown)
        self._wait_ready(launch_timeout)
        self.endpoint = RuntimeEndpoint(self.url, api_key=server_args.get("api_key"))

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"the lmprog server exited with {self._proc.returncode}: {self._tail()}"
                )
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        self.shutdown()
        raise TimeoutError(f"the lmprog server did not start within {timeout}s: {self._tail()}")

    def _tail(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-2000:]

    def shutdown(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL after 30 s); safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # The endpoint's methods, for code that uses the Runtime as a backend directly.
    def __getattr__(self, name: str) -> Any:
        if name == "endpoint":
            raise AttributeError(name)
        return getattr(self.endpoint, name)
