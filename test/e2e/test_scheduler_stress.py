"""Random traffic through the scheduler of a tiny random-weight Llama, in KV pools small enough
that retraction, eviction and chunking happen all the time: after every step the KV accounting
balances, every request ends exactly once with the tokens it asked for (or, constrained, where
its grammar completes, matching it), and prompt logprobs
(from random start positions, across chunks, retractions and cached prefixes) equal HF's.

LMPROG_STRESS_SEED=<anything> draws other traffic (for soaking the scheduler locally)."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest
import torch

from lmprog import LLM, SamplingParams
from lmprog.runtime.managers.io_struct import TokenizedGenerateReqInput

DIGITS = r"[0-9]{1,6}( [0-9]{1,6}){0,4}"  # what constrained requests must produce


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, llm) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(llm.get_tokenizer()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    llm.get_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "config",
    [
        {"page_size": 1, "chunked_prefill_size": 8},
        {"page_size": 4, "chunked_prefill_size": 8, "schedule_policy": "lpm"},
        {"page_size": 1, "chunked_prefill_size": -1, "schedule_policy": "dfs-weight"},
        {"page_size": 2, "chunked_prefill_size": 16, "disable_radix_cache": True},
    ],
    ids=["chunk8", "page4-lpm", "dfs-weight", "no-radix"],
)
def test_random_traffic_in_a_tiny_pool(tiny_model_dir: Path, config: dict) -> None:
    engine = LLM(
        str(tiny_model_dir),
        seed=0,
        dtype="float32",
        max_total_tokens=160,
        max_running_requests=6,
        **config,
    )
    sched = engine.scheduler
    rng = random.Random(repr(config) + os.environ.get("LMPROG_STRESS_SEED", ""))
    stems = [[rng.randrange(3, 1000) for _ in range(rng.randrange(4, 40))] for _ in range(4)]
    asked: dict[str, int] = {}  # rid -> expected tokens per sequence (ignore_eos: max_tokens)
    scored: dict[str, tuple[list[int], int]] = {}  # rid -> (prompt, logprob_start_len)
    constrained: set[str] = set()  # rids whose output must match DIGITS
    ended: dict[str, list] = {}
    for step in range(400):
        if step < 300 and rng.random() < 0.3:
            rid = f"r{step}"
            prompt = rng.choice(stems) + [
                rng.randrange(3, 1000) for _ in range(rng.randrange(1, 30))
            ]
            n = rng.choice([1, 1, 1, 2])
            asked[rid] = rng.randrange(1, 40)
            start = rng.randrange(0, len(prompt) + 1)
            if rng.random() < 0.25:
                scored[rid] = (prompt, start)
            if rng.random() < 0.2:
                constrained.add(rid)
            params = SamplingParams(
                n=n,
                max_tokens=asked[rid],
                ignore_eos=True,
                temperature=rng.choice([0, 1.0]),
                prompt_logprobs=0 if rid in scored else None,
                regex=DIGITS if rid in constrained else None,
            )
            sched.validate(prompt, params)
            sched.add_request(
                TokenizedGenerateReqInput(rid, prompt, params, logprob_start_len=start)
            )
        if asked and rng.random() < 0.05:
            sched.abort_request(rng.choice(list(asked)))
        for req in sched.step():
            if req.finished:
                ended.setdefault(req.rid, []).append(req)
        sched.check_integrity()
    while sched.has_work():
        for req in sched.step():
            if req.finished:
                ended.setdefault(req.rid, []).append(req)
        sched.check_integrity()
    assert set(ended) == set(asked)
    for rid, seqs in ended.items():
        assert sorted(s.index for s in seqs) == list(range(len(seqs)))  # each sequence once
        for seq in seqs:
            if seq.finished_reason.kind == "abort":
                assert len(seq.output_ids) <= asked[rid]
            elif rid in constrained:  # the grammar ends it, or the budget does
                text = seq.output_text.text
                assert len(seq.output_ids) <= asked[rid], rid
                if seq.finished_reason.kind == "stop":
                    assert re.fullmatch(DIGITS, text), (rid, text)
                else:
                    assert len(seq.output_ids) == asked[rid] and re.fullmatch(r"[0-9 ]*", text)
            else:
                assert (seq.finished_reason.kind, len(seq.output_ids)) == ("length", asked[rid])
    _check_prompt_logprobs(tiny_model_dir, ended, scored)
    grammar_done = [r for r in constrained if ended[r][0].finished_reason.kind == "stop"]
    assert len(grammar_done) >= 2, "too few constrained requests completed their grammar"
    if not os.environ.get("LMPROG_STRESS_SEED"):  # the pinned traffic is known to retract
        assert sched.stats.retracted_requests > 0, "the pool was meant to be too small"
    assert engine.reset_prefix_cache()
    assert engine.get_kv_stats()["free"] == engine.get_kv_stats()["total"]


def _check_prompt_logprobs(model_dir: Path, ended: dict, scored: dict) -> None:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(model_dir).eval()
    checked = 0
    for rid, (prompt, start) in scored.items():
        seq = ended[rid][0]
        if seq.finished_reason.kind == "abort":
            continue
        with torch.inference_mode():
            ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
        want = [None if p == 0 else float(ref[p - 1, prompt[p]]) for p in range(start, len(prompt))]
        got = [lp for lp, _ in seq.input_logprobs]
        assert len(got) == len(want), rid
        assert got == pytest.approx(want, abs=1e-4), rid
        checked += 1
    assert checked >= 3
