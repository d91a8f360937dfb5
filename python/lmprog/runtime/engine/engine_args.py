"""Engine arguments as vLLM's Python API takes them.

`LLM(model, **kwargs)` and `AsyncEngineArgs(model, **kwargs)` take the same keywords: the
server's flags (ServerArgs fields), plus vLLM's names `model`, `tokenizer`,
`tensor_parallel_size`, `runner`, `task` and `enforce_eager`. Both check them at once, before any
model loads.
"""

from __future__ import annotations

from typing import Any

from lmprog.runtime.server_args import DEFAULT_MODEL, ServerArgs


def server_args_from(
    model: str = DEFAULT_MODEL,
    *,
    tokenizer: str | None = None,
    tensor_parallel_size: int = 1,
    runner: str | None = None,
    task: str | None = None,
    enforce_eager: bool = False,
    **engine_args: Any,
) -> ServerArgs:
    """ServerArgs from vLLM-style keywords. `runner="pooling"` (vLLM; or `is_embedding=True`)
    serves the model as a pooling model, whose architecture decides what it computes
    (models/pooling_task.py); older vLLM's `task` ("embed", "classify", "score", "reward") asks
    for pooling too. `enforce_eager=True` is `disable_cuda_graph=True`."""
    if tensor_parallel_size != 1:
        engine_args["tp_size"] = tensor_parallel_size
    if engine_args.get("dp_size", 1) != 1:
        raise ValueError(
            f"dp_size must be 1 in-process, got {engine_args['dp_size']}: replicas are servers "
            "(python -m lmprog.launch_server --dp-size N)"
        )
    call = task_call(task)
    if runner is not None or call not in (None, "generate"):
        engine_args["runner"] = runner or "pooling"
    if enforce_eager:
        engine_args["disable_cuda_graph"] = True
    return ServerArgs.from_kwargs(model_path=model, tokenizer_path=tokenizer, **engine_args)


# Older vLLM's `task` -> the call it names (None: the architecture decides).
_TASK_CALLS = {
    None: None,
    "auto": None,
    "generate": "generate",
    "embed": "embed",
    "embedding": "embed",
    "classify": "classify",
    "score": "score",
    "reward": "reward",
}


def task_call(task: str | None) -> str | None:
    """The call (generate, embed, classify, score, reward) an older vLLM `task` names."""
    if task not in _TASK_CALLS:
        names = ", ".join(repr(t) for t in _TASK_CALLS if t is not None)
        raise ValueError(f"task must be one of {names}, got {task!r}")
    return _TASK_CALLS[task]


class AsyncEngineArgs:
    """What `AsyncLLM.from_engine_args` builds an engine from: `AsyncEngineArgs(model=...,
    dtype=..., max_total_tokens=..., ...)`, the keywords `LLM(...)` takes."""

    def __init__(self, model: str = DEFAULT_MODEL, **engine_args: Any) -> None:
        self.server_args = server_args_from(model, **engine_args)

    @property
    def model(self) -> str:
        return self.server_args.model_path

    def __repr__(self) -> str:
        return f"AsyncEngineArgs({self.server_args!r})"
