"""Runtime: a program starts its own server subprocess, runs on it, and shuts it down."""

from __future__ import annotations

import lmprog as sgl


@sgl.function
def capital(s):
    s += sgl.user("What is the capital of Germany?")
    s += sgl.assistant(sgl.gen("answer", max_tokens=12))
    return "done"


def test_runtime_starts_serves_and_shuts_down() -> None:
    runtime = sgl.Runtime(model_path="smollm2-135m-instruct", max_total_tokens=4096)
    try:
        sgl.set_default_backend(runtime)
        state = capital.run(temperature=0)
        assert "Berlin" in state["answer"] and state.ret_value == "done"
        info = sgl.get_server_info()
        assert info["kv_cache"]["total"] == 4096
        assert sgl.flush_cache()
        proc = runtime._proc
    finally:
        sgl.set_default_backend(None)
        runtime.shutdown()
    assert proc.returncode == 0
    runtime.shutdown()  # twice is fine
