"""SmolLM2 (the real GGUF weights): our logits equal HF transformers' on the same weights."""

from __future__ import annotations

import pytest
import torch

from lmprog import SamplingParams
from lmprog.runtime.managers.io_struct import TokenizedGenerateReqInput
from lmprog.runtime.managers.schedule_batch import Req
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


# ---- prompt logprobs ------------------------------------------------------------------------
PASSAGE = (
    "The river rose slowly through the night, and by morning the lower fields were under "
    "water. The farmers moved their animals to the hill behind the church, where the old "
    "road still ran dry."
)


@pytest.fixture(scope="module")
def hf_logprobs(llm):
    """HF transformers' log-softmax at every position of a token sequence."""
    from transformers import AutoModelForCausalLM

    loaded = llm.scheduler.model_runner.loaded
    hf = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    hf.load_state_dict(dict(loaded.weights()), strict=False)
    hf.tie_weights()
    hf.eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)

    return run


def _run_with_start(engine, ids: list[int], start: int, top: int) -> Req:
    """One request through the scheduler with SGLang's logprob_start_len."""
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=top)
    rid = f"start-{start}-{len(ids)}"
    engine.scheduler.add_request(
        TokenizedGenerateReqInput(rid, ids, params, logprob_start_len=start)
    )
    while True:
        for req in engine.scheduler.step():
            if req.rid == rid and req.finished:
                return req


def test_prompt_logprobs_match_hf_and_are_computed_not_cached(llm, hf_logprobs) -> None:
    ids = llm.get_tokenizer().encode(PASSAGE)
    ref = hf_logprobs(ids)
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3)
    for attempt in range(2):  # the second finds the whole prompt in the prefix cache
        out = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
        assert out.num_cached_tokens == 0, attempt  # every scored token was computed
        plp = out.prompt_logprobs
        assert len(plp) == len(ids) and plp[0] is None
        for pos in range(1, len(ids)):
            row = ref[pos - 1]
            assert abs(plp[pos][ids[pos]].logprob - float(row[ids[pos]])) < 1e-3, pos
            best = row.topk(3)
            ranked = {tid: lp for tid, lp in plp[pos].items() if lp.rank is not None}
            assert sorted(ranked, key=lambda t: ranked[t].rank) == best.indices.tolist(), pos
            assert [ranked[t].logprob for t in best.indices.tolist()] == pytest.approx(
                best.values.tolist(), abs=1e-3
            )


@pytest.mark.parametrize("start", [0, 5, 37])
def test_logprob_start_len_with_chunks_and_a_cached_prefix(
    engine_factory, llm, hf_logprobs, start
) -> None:
    """A 32-token chunk size splits the prompt; a cached prefix covers the start; the rows
    come from several chunks and still match HF from `start` on."""
    chunky = engine_factory(seed=0, chunked_prefill_size=32, debug_checks=True)
    ids = llm.get_tokenizer().encode(PASSAGE + " " + PASSAGE)
    assert len(ids) > 64
    ref = hf_logprobs(ids)
    chunky.generate({"prompt_token_ids": ids[:48]}, SamplingParams(max_tokens=1), use_tqdm=False)
    req = _run_with_start(chunky, ids, start, top=0)
    assert len(req.input_logprobs) == len(ids) - start
    want_cached = max(start - 1, 0) // chunky.server_args.page_size * chunky.server_args.page_size
    assert req.num_cached_tokens == min(want_cached, 48)
    for j, (chosen, top) in enumerate(req.input_logprobs):
        pos = start + j
        if pos == 0:
            assert chosen is None
            continue
        assert top == {}
        assert abs(chosen - float(ref[pos - 1, ids[pos]])) < 1e-3, pos
