"""The offline engine on CUDA (bf16 by dtype="auto") on the default model. Skipped on machines
without a GPU, and where the default model's package is not installed (the lent GPU machine:
its GGUF is too big to carry there; test_gpu_engine.py runs random-weight models instead)."""

from __future__ import annotations

import pytest
import torch

from lmprog import SamplingParams
from lmprog.runtime.model_loader.resolve import resolve_model


def _default_model_installed() -> bool:
    try:
        resolve_model("smollm2-135m-instruct")
    except ValueError:
        return False
    return True


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not _default_model_installed(), reason="the default model is not installed"),
]


def test_default_model_on_cuda_answers_berlin_in_bf16(engine_factory) -> None:
    llm = engine_factory(device="cuda", max_total_tokens=4096)
    assert llm.scheduler.model_runner.dtype == torch.bfloat16
    chat = [{"role": "user", "content": "What is the capital of Germany?"}]
    outs = llm.chat([chat] * 4, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    assert all("Berlin" in o.outputs[0].text for o in outs)
    sampled = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=8, seed=1, n=2)
    assert len(llm.generate("Hello", sampled, use_tqdm=False)[0].outputs) == 2
