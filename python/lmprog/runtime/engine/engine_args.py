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
    """ServerArgs from vLLM-style keywords. `runner="pooling"` (vLLM) or `task="embed"` (older
    vLLM) serve the model as an embedder, like `is_embedding=True`; encoder models (BERT) are
    embedders anyway. `enforce_eager=True` is `disable_cuda_graph=True`."""
    if tensor_parallel_size != 1:
        raise ValueError(f"tensor_parallel_size must be 1 (one device), got {tensor_parallel_size}")
    if _wants_embedding(runner, task):
        engine_args["is_embedding"] = True
    if enforce_eager:
        engine_args["disable_cuda_graph"] = True
    return ServerArgs.from_kwargs(model_path=model, tokenizer_path=tokenizer, **engine_args)


def _wants_embedding(runner: str | None, task: str | None) -> bool:
    if runner not in (None, "auto", "generate", "pooling"):
        raise ValueError(f"runner must be 'generate' or 'pooling', got {runner!r}")
    if task not in (None, "auto", "generate", "embed", "embedding"):
        raise ValueError(f"task must be 'generate' or 'embed', got {task!r}")
    return runner == "pooling" or task in ("embed", "embedding")


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
