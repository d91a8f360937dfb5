"""Every frontend quick-start example runs to the end against the test server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "frontend"
ROOT = EXAMPLES.parents[1]


@pytest.mark.parametrize(
    ("script", "needle"),
    [
        ("multi_turn.py", "Berlin"),
        ("select_choices.py", "Germany -> "),
        ("fork.py", "In summary:"),
        ("streaming.py", "about a lighthouse:\n"),
        ("openai_backend.py", "Berlin"),
    ],
)
def test_example_runs(server, script: str, needle: str) -> None:
    if script == "openai_backend.py":
        args = ["--base-url", f"{server.url}/v1", "--model", "smollm2-135m-instruct"]
    else:
        args = ["--url", server.url]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert needle in out.stdout, out.stdout
