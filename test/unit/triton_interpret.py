"""Runs Python code under Triton's interpreter (TRITON_INTERPRET=1) in a subprocess, so Triton
kernels are checked on CPU; the interpreter is chosen when Triton is imported, hence the process."""

from __future__ import annotations

import os
import subprocess
import sys


def run_interpreted(code: str) -> str:
    """The last line `code` prints; fails the test with its stderr if it raises. The subprocess
    runs in this folder, so it can import the test modules' helpers."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=os.path.dirname(os.path.abspath(__file__)),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]
