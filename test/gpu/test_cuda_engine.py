"""The offline engine on CUDA (bf16 by dtype="auto"). Skipped on machines without a GPU."""

from __future__ import annotations

import pytest
import torch

from lmprog import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_default_model_on_cuda_answers_berlin_in_bf16(engine_factory) -> None:
    llm = engine_factory(device="cuda", max_total_tokens=4096)
    assert llm.scheduler.model_runner.dtype == torch.bfloat16
    chat = [{"role": "user", "content": "What is the capital of Germany?"}]
    outs = llm.chat([chat] * 4, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    assert all("Berlin" in o.outputs[0].text for o in outs)
    sampled = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=8, seed=1, n=2)
    assert len(llm.generate("Hello", sampled, use_tqdm=False)[0].outputs) == 2
