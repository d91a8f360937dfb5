"""`LLM.beam_search` on the default model: the same best beams as HF transformers' beam search
on the same weights, beams sharing their history's KV in the prefix cache, nothing held after."""

from __future__ import annotations

import torch

from lmprog import BeamSearchParams

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def test_best_beams_match_hf_beam_search(llm) -> None:
    from transformers import AutoModelForCausalLM

    width, steps = 4, 6
    ours = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=width, max_tokens=steps))
    loaded = llm.scheduler.model_runner.loaded
    hf = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    hf.load_state_dict(dict(loaded.weights()), strict=False)
    hf.tie_weights()
    eos = sorted(llm.scheduler.eos_token_ids)
    for prompt, out in zip(PROMPTS, ours):
        ids = torch.tensor([llm.get_tokenizer().encode(prompt)])
        with torch.inference_mode():
            ref = hf.eval().generate(
                ids, attention_mask=torch.ones_like(ids), num_beams=width,
                num_return_sequences=width, max_new_tokens=steps, early_stopping=True,
                do_sample=False, length_penalty=1.0, eos_token_id=eos, pad_token_id=eos[0],
                output_scores=True, return_dict_in_generate=True,
            )  # fmt: skip
        assert [s.tokens for s in out.sequences] == ref.sequences.tolist(), prompt
        # HF's sequence score is the length-penalized cumulative logprob.
        ours_scores = [s.cum_logprob / steps for s in out.sequences]
        assert torch.allclose(torch.tensor(ours_scores), ref.sequences_scores, atol=1e-3)
        assert all(
            s.text == llm.get_tokenizer().decode(s.tokens[ids.shape[1] :]) for s in out.sequences
        )


def test_beams_share_their_prefix_in_the_cache(llm) -> None:
    llm.reset_prefix_cache()
    width, steps = 4, 8
    out = llm.beam_search(PROMPTS[0], BeamSearchParams(beam_width=width, max_tokens=steps))[0]
    stats = llm.get_kv_stats()
    assert stats["protected"] == 0 and stats["held_by_requests"] == 0  # finished beams hold none
    prompt_len = len(out.sequences[0].tokens) - steps
    # Step t ran `width` prompts of prompt_len + t tokens (one at t = 0), each cached when it
    # finished: stored apart, they would take the sum of those lengths. The tree holds a small
    # part of that: the beams' shared histories are stored once.
    unshared = prompt_len + sum(width * (prompt_len + t) for t in range(1, steps))
    assert prompt_len + steps - 1 <= stats["evictable"] < unshared / 4, (stats, unshared)
    assert llm.reset_prefix_cache() and llm.get_kv_stats()["free"] == stats["total"]
