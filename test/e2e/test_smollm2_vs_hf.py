"""SmolLM2 (the real GGUF weights): our logits equal HF transformers' on the same weights."""

from __future__ import annotations

import torch

from lmprog import SamplingParams
from lmprog.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode


def _our_logits(llm, ids: list[int]) -> torch.Tensor:
    """Teacher-forced logits of every position, through the engine's paged KV pool."""
    mr = llm.scheduler.model_runner
    slot = mr.req_to_token_pool.alloc()
    kv = mr.allocator.alloc(len(ids))
    try:
        mr.req_to_token_pool.write(slot, 0, kv)
        fb = ForwardBatch.build(
            ForwardMode.EXTEND,
            ids,
            [slot],
            [0],
            [len(ids)],
            kv,
            mr.device,
            logits_indices=torch.arange(len(ids)),
        )
        return mr.forward(fb)
    finally:
        mr.allocator.free(kv)
        mr.req_to_token_pool.free(slot)


def test_smollm2_logits_match_hf_on_the_germany_answer(llm) -> None:
    from transformers import AutoModelForCausalLM

    chat = [{"role": "user", "content": "What is the capital of Germany?"}]
    out = llm.chat(chat, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert "Berlin" in out.outputs[0].text
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    loaded = llm.scheduler.model_runner.loaded
    hf = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    hf.load_state_dict(dict(loaded.weights()), strict=False)
    hf.tie_weights()
    with torch.inference_mode():
        ref = hf.eval()(torch.tensor([ids])).logits[0]
    ours = _our_logits(llm, ids)
    assert torch.allclose(ours, ref, atol=1e-3, rtol=0), (ours - ref).abs().max()
    # and greedy continuation agrees with HF's argmax at every answer position
    n = len(out.prompt_token_ids)
    assert ref[n - 1 : -1].argmax(-1).tolist() == out.outputs[0].token_ids[: len(ids) - n]
