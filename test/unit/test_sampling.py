"""Sampling: parameter validation, the batched Sampler's semantics, penalties, seeding.

Seeded sampling is a pure function of (seed, step, logits, parameters), so every
statistical test here is deterministic: fixed seeds, fixed outcomes, no flakes.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmprog
from lmprog.runtime.layers.sampler import Sampler, SamplerOutput
from lmprog.runtime.sampling.penalties import PenaltyInputs, apply_penalties_
from lmprog.runtime.sampling.sampling_batch_info import SamplingBatchInfo
from lmprog.runtime.sampling.sampling_params import RequestOutputKind, SamplingParams
from lmprog.runtime.sampling.seeded_random import log_exponentials, mix64

CPU = torch.device("cpu")
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def make_info(
    params: list[SamplingParams],
    vocab: int,
    seeds: list[int] | None = None,
    outputs: list[list[int]] | None = None,
    prompts: list[list[int]] | None = None,
    eos: tuple[int, ...] = (),
    device: torch.device = CPU,
) -> SamplingBatchInfo:
    rows = len(params)
    return SamplingBatchInfo.from_rows(
        params,
        seeds if seeds is not None else list(range(rows)),
        outputs if outputs is not None else [[] for _ in range(rows)],
        prompts if prompts is not None else [[] for _ in range(rows)],
        list(eos),
        vocab,
        device,
    )


def sample(
    logits: torch.Tensor, params: list[SamplingParams], sampler: Sampler | None = None, **kw
) -> SamplerOutput:
    info = make_info(params, logits.shape[1], device=logits.device, **kw)
    return (sampler or Sampler())(logits, info)


def frequencies(logits_row: torch.Tensor, params: SamplingParams, draws: int) -> torch.Tensor:
    """Empirical token frequencies: one row per seed, all with the same logits."""
    logits = logits_row.expand(draws, -1).contiguous()
    tokens = sample(logits, [params] * draws, seeds=list(range(1000, 1000 + draws)))
    return torch.bincount(tokens.next_token_ids, minlength=logits.shape[1]).double() / draws


def chi_square(observed: torch.Tensor, expected: torch.Tensor, draws: int) -> float:
    keep = expected > 0
    assert observed[~keep].sum() == 0, "a token with probability 0 was sampled"
    return float((draws * (observed - expected)[keep] ** 2 / expected[keep]).sum())


# -- SamplingParams ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"temperature": -1.0}, ["temperature", ">= 0", "-1.0"]),
        ({"temperature": math.inf}, ["temperature", "finite", "inf"]),
        ({"top_p": 1.5}, ["top_p", "(0, 1]", "1.5"]),
        ({"top_p": 0.0}, ["top_p", "(0, 1]", "0.0"]),
        ({"top_k": -2}, ["top_k", "-1", ">= 1", "-2"]),
        ({"min_p": 1.5}, ["min_p", "[0, 1]", "1.5"]),
        ({"n": 0}, ["n must be at least 1", "0"]),
        ({"max_tokens": 0}, ["max_tokens", "at least 1", "0"]),
        ({"min_tokens": -1}, ["min_tokens", ">= 0", "-1"]),
        ({"min_tokens": 5, "max_tokens": 3}, ["min_tokens", "max_tokens", "5", "3"]),
        ({"presence_penalty": 2.5}, ["presence_penalty", "[-2, 2]", "2.5"]),
        ({"frequency_penalty": -3}, ["frequency_penalty", "[-2, 2]", "-3"]),
        ({"repetition_penalty": 0.0}, ["repetition_penalty", "> 0", "0.0"]),
        ({"logprobs": -1}, ["logprobs", ">= 0", "-1"]),
        ({"stop": ["ok", ""]}, ["stop", "non-empty", "''"]),
        ({"stop_token_ids": [3, -1]}, ["stop_token_ids", ">= 0", "-1"]),
        ({"n": 1.5}, ["n", "integer", "1.5"]),
        ({"temperature": "hot"}, ["temperature", "number", "hot"]),
        ({"ignore_eos": 1}, ["ignore_eos", "bool", "1"]),
        ({"logit_bias": {-1: 5.0}}, ["logit_bias", "token id -1", ">= 0"]),
        ({"logit_bias": {"-3": 5.0}}, ["logit_bias", "token id -3", ">= 0"]),
        ({"logit_bias": {7: 101}}, ["logit_bias", "token id 7", "[-100, 100]", "101"]),
        ({"logit_bias": {7: -100.5}}, ["logit_bias", "[-100, 100]", "-100.5"]),
        ({"logit_bias": {7: math.inf}}, ["logit_bias", "[-100, 100]", "inf"]),
        ({"logit_bias": {7: "high"}}, ["logit_bias", "token id 7", "number", "'high'"]),
        ({"logit_bias": {7: True}}, ["logit_bias", "number", "True"]),
        ({"logit_bias": {"x7": 1.0}}, ["logit_bias", "integer token ids", "'x7'"]),
        ({"logit_bias": {7.0: 1.0}}, ["logit_bias", "integer token ids", "7.0"]),
        ({"logit_bias": {"7": 1.0, 7: 2.0}}, ["logit_bias", "token id 7", "more than once"]),
        ({"logit_bias": [[7, 1.0]]}, ["logit_bias", "map of token id to bias", "list"]),
        ({"output_kind": 3}, ["output_kind", "RequestOutputKind", "DELTA (1)", "got 3"]),
        ({"output_kind": "delta"}, ["output_kind", "RequestOutputKind", "'delta'"]),
    ],
)
def test_invalid_params_name_field_value_and_limit(kwargs: dict, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as error:
        SamplingParams(**kwargs)
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


def test_params_are_normalised() -> None:
    params = SamplingParams(stop="###", stop_token_ids=(7, 9), top_k=0, temperature=1)
    assert params.stop == ["###"]
    assert params.stop_token_ids == [7, 9]
    assert params.top_k == -1
    assert isinstance(params.temperature, float)
    assert SamplingParams().stop == [] and SamplingParams().stop_token_ids == []
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None
    assert SamplingParams().output_kind is RequestOutputKind.CUMULATIVE
    assert SamplingParams(output_kind=2).output_kind is RequestOutputKind.FINAL_ONLY


def test_logit_bias_keys_from_json_become_ints() -> None:
    """OpenAI clients send {"50256": -100}: JSON object keys are always strings."""
    params = SamplingParams(logit_bias={"50256": -100, 7: 1, "0": 100.0})
    assert params.logit_bias == {50256: -100.0, 7: 1.0, 0: 100.0}
    assert all(type(k) is int and type(v) is float for k, v in params.logit_bias.items())
    assert params.uses_logit_bias
    assert (
        not SamplingParams().uses_logit_bias and not SamplingParams(logit_bias={}).uses_logit_bias
    )
    copy = params.clone()
    copy.logit_bias[3] = 2.0
    assert 3 not in params.logit_bias


def test_greedy_resets_truncation_and_tiny_temperature_is_greedy() -> None:
    params = SamplingParams(temperature=1e-6, top_p=0.5, top_k=3, min_p=0.2)
    assert params.is_greedy
    assert (params.top_p, params.top_k, params.min_p) == (1.0, -1, 0.0)
    assert not SamplingParams(temperature=1e-4).is_greedy


def test_clone_and_overrides_are_independent_and_validated() -> None:
    params = SamplingParams(stop=["a"], max_tokens=8)
    copy = params.clone()
    copy.stop.append("b")
    assert params.stop == ["a"] and copy == SamplingParams(stop=["a", "b"], max_tokens=8)
    assert params.with_overrides(max_tokens=1).max_tokens == 1
    with pytest.raises(ValueError, match="max_tokens must be at least 1, got 0"):
        params.with_overrides(max_tokens=0)


def test_validate_for_model() -> None:
    SamplingParams(stop_token_ids=[9], logprobs=20).validate_for_model(vocab_size=10)
    with pytest.raises(ValueError, match=r"stop_token_ids contains 10.*< 10"):
        SamplingParams(stop_token_ids=[10]).validate_for_model(vocab_size=10)
    with pytest.raises(ValueError, match=r"logprobs must be <= 5.*got 6"):
        SamplingParams(logprobs=6).validate_for_model(vocab_size=10, max_logprobs=5)
    SamplingParams(logit_bias={9: 1.0}).validate_for_model(vocab_size=10)
    with pytest.raises(
        ValueError,
        match=r"logit_bias has token id 99999, outside the vocabulary \(ids must be < 49152\)",
    ):
        SamplingParams(logit_bias={"99999": -100}).validate_for_model(vocab_size=49152)


def test_sampling_params_import_without_torch() -> None:
    package_root = str(Path(lmprog.__file__).resolve().parents[1])
    code = (
        "import sys; import lmprog.runtime.sampling.sampling_params as m; "
        "from lmprog.sampling_params import RequestOutputKind, SamplingParams; "
        "from lmprog import RequestOutputKind as Kind; "
        "SamplingParams(temperature=0.5, output_kind=Kind.DELTA); "
        "assert m.RequestOutputKind is RequestOutputKind is Kind; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = {**os.environ, "PYTHONPATH": package_root}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# -- greedy and truncation ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_greedy_is_argmax_first_index_on_ties(device: torch.device) -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0)).to(device)
    logits[3, [7, 11]] = 100.0  # a tie: the first index wins
    out = sample(logits, [SamplingParams(temperature=0.0)] * 8)
    assert out.next_token_ids.dtype == torch.int64
    assert torch.equal(out.next_token_ids, logits.argmax(dim=-1))
    assert out.next_token_ids[3] == 7
    assert out.logprobs is None and out.top_logprobs is None


def test_top_k_1_and_tiny_top_p_equal_greedy() -> None:
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(1)) * 3
    greedy = logits.argmax(dim=-1)
    for params in (
        SamplingParams(temperature=1.5, top_k=1),
        SamplingParams(temperature=1.5, top_p=1e-6),
        SamplingParams(temperature=1.5, min_p=1.0),
    ):
        assert torch.equal(sample(logits, [params] * 16).next_token_ids, greedy), params


def test_top_k_top_p_min_p_keep_the_right_tokens() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    logits = probs.log()[None, :]

    def support(**kw: float) -> set[int]:
        freq = frequencies(logits, SamplingParams(temperature=1.0, **kw), draws=2000)
        return set(torch.nonzero(freq).flatten().tolist())

    assert support(top_k=2) == {0, 1}
    assert support(top_p=0.65) == {0, 1}  # 0.4 < 0.65 <= 0.7: token 1 completes the mass
    assert support(top_p=0.75) == {0, 1, 2}
    assert support(min_p=0.6) == {0, 1}  # 0.2 < 0.6 * 0.4 <= 0.3
    assert support(min_p=0.12) == {0, 1, 2, 3}  # 0.04 < 0.12 * 0.4 <= 0.06
    # top_p counts mass within the top-k set, renormalised (vLLM / HF semantics):
    # top-2 renormalised is [4/7, 3/7], and 4/7 already reaches 0.5.
    assert support(top_k=2, top_p=0.5) == {0}


def test_temperature_sharpens_and_flattens() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    draws = 4000
    cold = frequencies(probs.log()[None, :], SamplingParams(temperature=0.5), draws)
    expected_cold = probs**2 / (probs**2).sum()  # p^(1/T), renormalised
    assert chi_square(cold, expected_cold.double(), draws) < 13.8  # chi2(2 dof) at 0.999
    hot = frequencies(probs.log()[None, :], SamplingParams(temperature=100.0), draws)
    assert (hot - 1 / 3).abs().max() < 0.03


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.3, top_k=6, top_p=0.8, min_p=0.02),
    ],
    ids=["plain", "top_p", "all_truncations"],
)
def test_sampled_frequencies_match_the_distribution(params: SamplingParams) -> None:
    logits = torch.randn(1, 10, generator=torch.Generator().manual_seed(2)) * 1.5
    draws = 20000
    expected = _reference_probs(logits[0], params)
    observed = frequencies(logits, params, draws)
    # 9 degrees of freedom at most: the 0.999 quantile is 27.9.
    assert chi_square(observed, expected, draws) < 27.9


def _reference_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The target distribution, computed the slow, obvious way (sort, mask, renormalise)."""
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    order = probs.argsort(descending=True)
    sorted_probs = probs[order]
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if params.top_k > 0:
        keep[params.top_k :] = False
    renormalised = sorted_probs * keep / (sorted_probs * keep).sum()
    keep &= (renormalised.cumsum(0) - renormalised) < params.top_p
    keep &= sorted_probs >= params.min_p * sorted_probs[0]
    result = torch.zeros_like(probs)
    result[order] = sorted_probs * keep
    return result / result.sum()


def test_candidate_shortcut_matches_the_full_sort() -> None:
    """The topk shortcut, its exactness test and every fallback give the token a full sort
    gives: a sampler whose first candidate set is tiny must agree with one whose first set
    is the whole vocabulary (a sort), row for row."""
    generator = torch.Generator().manual_seed(3)
    vocab, rows = 400, 240
    scale = torch.tensor([0.3, 1.0, 4.0])[torch.arange(rows) % 3][:, None]
    logits = torch.randn(rows, vocab, generator=generator) * scale
    choices = [
        {"top_p": 0.9},
        {"top_p": 0.5},
        {"top_k": 50},
        {"top_k": 3},
        {"min_p": 0.05},
        {"min_p": 0.3, "top_p": 0.8},
        {"top_k": 100, "top_p": 0.9},
        {"top_k": 40, "min_p": 0.1},
        {"top_k": 300, "top_p": 0.95, "min_p": 0.01},
    ]
    params = [SamplingParams(temperature=1.0, **choices[i % len(choices)]) for i in range(rows)]
    narrow = sample(logits, params, sampler=Sampler(candidates=4))
    full = sample(logits, params, sampler=Sampler(candidates=vocab))
    assert torch.equal(narrow.next_token_ids, full.next_token_ids)


@pytest.mark.parametrize(
    ("head", "top_p", "min_p", "support"),
    [
        # The 4 candidates hold 0.92 >= top_p, yet top_p is measured against the top-100
        # mass (~1.0): token 3 (0.85 before it) stays, as 0.85 < 0.9 * 1.0 (not < 0.9 * 0.92).
        ([0.45, 0.3, 0.1, 0.07], 0.9, 0.0, {0, 1, 2, 3}),
        ([0.45, 0.3, 0.1, 0.07], 0.9, 0.01, {0, 1, 2, 3}),
        # The 4th candidate is under the min_p floor, so min_p keeps only candidates; still
        # token 2 (0.75 before it) stays: 0.75 < 0.8 * 1.0, though not < 0.8 * 0.884.
        ([0.5, 0.25, 0.13, 0.004], 0.8, 0.01, {0, 1, 2}),
    ],
)
def test_top_p_inside_a_top_k_wider_than_the_candidates(
    head: list[float], top_p: float, min_p: float, support: set[int]
) -> None:
    vocab, rows = 400, 300
    probs = torch.full((vocab,), 1e-9)
    probs[:4] = torch.tensor(head)
    probs[4:100] = (1.0 - sum(head)) / 96
    logits = (probs / probs.sum()).log().expand(rows, -1).contiguous()
    params = [SamplingParams(temperature=1.0, top_k=100, top_p=top_p, min_p=min_p)] * rows
    # One row without top_k, and top_k=100 > 4 * candidates: the first pass then tries
    # only 4 candidates, which must not be trusted for the top_k rows.
    params[0] = SamplingParams(temperature=1.0, top_p=0.9)
    narrow = sample(logits, params, sampler=Sampler(candidates=4)).next_token_ids
    full = sample(logits, params, sampler=Sampler(candidates=vocab)).next_token_ids
    assert torch.equal(narrow, full)
    assert set(full[1:].tolist()) == support


def test_padded_vocabulary_columns_are_never_sampled() -> None:
    logits = torch.zeros(4, 12)
    logits[:, 10:] = 50.0  # padding columns past the real vocabulary of 10
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(logprobs=2),
    ]
    out = Sampler()(logits, make_info(params, vocab=10))
    assert (out.next_token_ids < 10).all()
    assert torch.allclose(out.logprobs, torch.full((4,), -math.log(10)))
    with pytest.raises(ValueError, match="logits have 12 columns; the vocabulary has 13"):
        Sampler()(logits, make_info(params, vocab=13))


# -- penalties and min_tokens --------------------------------------------------------------


def test_penalties_match_a_hand_computed_example() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0]] * 3)
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0),
        SamplingParams(),  # no penalty: untouched
        SamplingParams(repetition_penalty=2.0),  # repetition only
    ]
    prompts = [[0, 4, 99], [0, 4], [5]]  # 99 is outside the vocabulary: ignored
    outputs = [[3, 3, 1], [3], [2]]
    inputs = PenaltyInputs.from_rows(params, outputs, prompts, vocab_size=6, device=CPU)
    assert inputs is not None
    result = apply_penalties_(logits.clone(), inputs)
    expected = torch.tensor(
        [
            # 0: prompt, >0 -> /2; 1: output once -> *2, -0.25, -0.5; 2: unseen;
            # 3: output twice -> /2, -0.5, -0.5; 4: prompt, <0 -> *2; 5: unseen
            [1.0, -2.75, 0.5, 0.5, -4.0, 0.0],
            [2.0, -1.0, 0.5, 3.0, -2.0, 0.0],
            [2.0, -1.0, 0.25, 3.0, -2.0, 0.0],  # 5 is 0.0 in the prompt: 0 * 2 = 0
        ]
    )
    assert torch.allclose(result, expected)
    assert PenaltyInputs.from_rows([SamplingParams()], [[1]], [[1]], 6, CPU) is None


def test_penalties_change_the_greedy_choice_and_spare_the_logprobs() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]])
    params = [SamplingParams(temperature=0.0, frequency_penalty=0.2, logprobs=1)]
    out = sample(logits, params, outputs=[[0]])
    assert out.next_token_ids.tolist() == [1]
    # logprobs come from the raw logits, before penalties
    assert torch.allclose(out.logprobs, torch.log_softmax(logits, -1)[:, 1])
    assert out.top_logprob_ids.tolist() == [[0]]


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 5.0, 6.0]] * 4)  # 4 = EOS is best, 3 = stop id next
    eos = (4,)
    greedy = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3])
    ignoring = greedy.with_overrides(ignore_eos=True)
    sampled = SamplingParams(temperature=5.0, min_tokens=2, stop_token_ids=[3])
    out = sample(
        logits, [greedy, greedy, ignoring, greedy], outputs=[[], [1], [1], [1, 1]], eos=eos
    )
    assert out.next_token_ids.tolist() == [2, 2, 2, 4]
    early = sample(logits[:1].expand(500, -1), [sampled] * 500, outputs=[[7]] * 500, eos=eos)
    assert not torch.isin(early.next_token_ids, torch.tensor([3, 4])).any()
    assert torch.isin(early.next_token_ids, torch.tensor([0, 1, 2])).all()


# -- logit_bias --------------------------------------------------------------------------------


def test_logit_bias_minus_100_bans_the_favourite_token() -> None:
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(7)) * 3
    logits[:, 42] += 12.0  # token 42 is every row's clear favourite
    draws = 400
    many = logits[:1].expand(draws, -1).contiguous()
    for params in (
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.5, top_k=5),
        SamplingParams(temperature=2.0, top_p=0.9),
    ):
        assert (sample(many, [params] * draws).next_token_ids == 42).any(), params
        banned = params.with_overrides(logit_bias={42: -100})
        tokens = sample(many, [banned] * draws, seeds=list(range(draws))).next_token_ids
        assert not (tokens == 42).any(), params
    greedy = SamplingParams(temperature=0.0, logit_bias={"42": -100})
    runner_up = logits.clone()
    runner_up[:, 42] = -math.inf
    assert torch.equal(sample(logits, [greedy] * 6).next_token_ids, runner_up.argmax(-1))


def test_logit_bias_plus_100_forces_a_token() -> None:
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(8)) * 3
    unlikely = int(logits[0].argmin())  # the least likely token of row 0
    params = [
        SamplingParams(temperature=0.0, logit_bias={unlikely: 100}),
        SamplingParams(temperature=1.0, logit_bias={unlikely: 100}),
        SamplingParams(temperature=1.0, top_k=3, top_p=0.5, logit_bias={unlikely: 100}),
        SamplingParams(temperature=1.0, min_p=0.2, logit_bias={unlikely: 100}),
    ]
    same = logits[:1].expand(4, -1)
    assert sample(same, params).next_token_ids.tolist() == [unlikely] * 4
    # Masks win: min_tokens' -inf on EOS, like a grammar's, stays -inf whatever the bias.
    early = SamplingParams(temperature=0.0, min_tokens=1, logit_bias={unlikely: 100})
    out = sample(same[:1], [early], eos=(unlikely,))
    assert out.next_token_ids.item() != unlikely
    masked = same[:1].clone()
    masked[0, unlikely] = -math.inf
    assert sample(masked, [params[0]]).next_token_ids.item() != unlikely


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_logit_bias_rows_in_a_batch_match_rows_alone(device: torch.device) -> None:
    """Each biased row picks what it would from its logits plus the bias, whatever the
    other rows are; rows without a bias are untouched."""
    generator = torch.Generator().manual_seed(9)
    vocab, rows = 500, 8
    logits = (torch.randn(rows, vocab, generator=generator) * 2).to(device)
    biases = [
        {
            int(t): float(b)
            for t, b in zip(
                torch.randint(0, vocab, (20,), generator=generator),
                torch.empty(20).uniform_(-6, 6, generator=generator),
            )
        }
        if i % 2 == 0
        else None
        for i in range(rows)
    ]
    kinds = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_p=0.9, presence_penalty=0.5),
        SamplingParams(temperature=1.2, top_k=30),
    ]
    params = [kinds[i // 2].with_overrides(logit_bias=biases[i]) for i in range(rows)]
    seeds = [100 + i for i in range(rows)]
    outputs = [
        [int(t) for t in torch.randint(0, vocab, (i,), generator=generator)] for i in range(rows)
    ]
    batch = sample(logits, params, seeds=seeds, outputs=outputs).next_token_ids
    for i in range(rows):
        plain = params[i].with_overrides(logit_bias=None)
        biased = logits[i : i + 1].clone()
        for token, bias in (biases[i] or {}).items():
            biased[0, token] += bias
        expected = sample(biased, [plain], seeds=[seeds[i]], outputs=[outputs[i]])
        alone = sample(logits[i : i + 1], [params[i]], seeds=[seeds[i]], outputs=[outputs[i]])
        assert batch[i] == expected.next_token_ids[0] == alone.next_token_ids[0], i
    # The biases are strong enough to matter: without them some rows pick differently.
    unbiased = [p.with_overrides(logit_bias=None) for p in params]
    assert not torch.equal(
        batch, sample(logits, unbiased, seeds=seeds, outputs=outputs).next_token_ids
    )


def test_logit_bias_leaves_logprobs_raw() -> None:
    """Like penalties, a bias changes the pick, not the model's reported probabilities."""
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(10)) * 2
    forced = int(logits[0].argmin())
    params = [
        SamplingParams(temperature=0.0, logprobs=3, logit_bias={forced: 100}),
        SamplingParams(temperature=1.0, logprobs=3, logit_bias={int(logits[1].argmax()): -100}),
    ]
    out = sample(logits, params)
    assert out.next_token_ids[0] == forced
    reference = torch.log_softmax(logits, dim=-1)
    chosen = reference.gather(1, out.next_token_ids[:, None]).squeeze(1)
    assert torch.allclose(out.logprobs, chosen, atol=1e-5)
    top_values, top_ids = reference.topk(3, dim=-1)
    assert torch.equal(out.top_logprob_ids, top_ids)
    assert torch.allclose(out.top_logprobs, top_values, atol=1e-5)


# -- logprobs -----------------------------------------------------------------------------------


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(4)) * 2
    params = [
        SamplingParams(temperature=0.5, top_p=0.8, logprobs=3, presence_penalty=1.0),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.0, logprobs=5),
        SamplingParams(temperature=1.0),
    ]
    out = sample(logits, params, outputs=[[1, 2], [], [], []])
    reference = torch.log_softmax(logits, dim=-1)
    chosen = reference.gather(1, out.next_token_ids[:, None]).squeeze(1)
    assert torch.allclose(out.logprobs, chosen, atol=1e-5)
    top_values, top_ids = reference.topk(5, dim=-1)
    assert torch.equal(out.top_logprob_ids, top_ids)
    assert torch.allclose(out.top_logprobs, top_values, atol=1e-5)
    only_chosen = sample(logits, [SamplingParams(logprobs=0)] * 4)
    assert only_chosen.logprobs is not None and only_chosen.top_logprobs is None


# -- seeding --------------------------------------------------------------------------------------


def test_same_seed_same_token_whatever_the_batch() -> None:
    generator = torch.Generator().manual_seed(5)
    rows = 32
    logits = torch.randn(rows, 500, generator=generator) * 2
    params = [SamplingParams(temperature=1.0, top_p=0.95)] * rows
    seeds = [7 * i + 1 for i in range(rows)]
    steps = [[0] * (i % 5) for i in range(rows)]
    together = sample(logits, params, seeds=seeds, outputs=steps).next_token_ids
    # Reversed order, and padded with unrelated greedy / penalised / top-k rows.
    order = list(reversed(range(rows)))
    # top_k=400 also widens the batch's first candidate set (256 -> 400): other paths,
    # same tokens.
    extra = [SamplingParams(temperature=0.0), SamplingParams(top_k=400, presence_penalty=1.0)]
    mixed_logits = torch.cat([logits[order], torch.randn(2, 500, generator=generator)])
    mixed = sample(
        mixed_logits,
        [params[i] for i in order] + extra,
        seeds=[seeds[i] for i in order] + [1, 2],
        outputs=[steps[i] for i in order] + [[5], [5, 5]],
    ).next_token_ids
    assert torch.equal(mixed[:rows], together[order])
    alone = [
        sample(logits[i : i + 1], [params[i]], seeds=[seeds[i]], outputs=[steps[i]])
        for i in range(rows)
    ]
    assert torch.equal(torch.cat([o.next_token_ids for o in alone]), together)


def test_different_seeds_and_steps_draw_differently() -> None:
    logits = torch.zeros(200, 1000)  # uniform: every draw is a fresh guess
    params = [SamplingParams(temperature=1.0)] * 200
    first = sample(logits, params, seeds=[1] * 200, outputs=[[0] * i for i in range(200)])
    second = sample(logits, params, seeds=[2] * 200, outputs=[[0] * i for i in range(200)])
    agree = (first.next_token_ids == second.next_token_ids).float().mean()
    assert agree < 0.02  # 1/1000 expected by chance
    # Along the steps of one seed the tokens look uniform too (no repeats beyond chance).
    assert first.next_token_ids.unique().numel() > 170
    huge_seed = sample(logits[:1], params[:1], seeds=[2**64 + 1])  # same low 64 bits as 1
    assert huge_seed.next_token_ids.item() == first.next_token_ids[0].item()


def test_exponential_variates_are_well_formed() -> None:
    """The hash's Exp(1) draws: finite, positive, with the right mean and no correlation
    between neighbouring tokens or neighbouring seeds."""
    keys = torch.arange(64, dtype=torch.int32) * 7919
    e = log_exponentials(keys, None, 4096).exp().double()
    assert torch.isfinite(e).all() and (e > 0).all()
    assert abs(e.mean().item() - 1.0) < 0.01 and abs(e.var().item() - 1.0) < 0.03
    centred = e - 1.0
    assert abs((centred[:, 1:] * centred[:, :-1]).mean().item()) < 0.01
    assert abs((centred[1:] * centred[:-1]).mean().item()) < 0.01


def test_mix64_matches_a_python_reference() -> None:
    """torch int64 arithmetic wraps and shifts arithmetically; the masked version must
    agree bit for bit with splitmix64 on unsigned Python ints."""
    mask = (1 << 64) - 1

    def reference(x: int) -> int:
        x &= mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    values = [0, 1, -1, 2**63 - 1, -(2**63), 123456789, -987654321]
    mixed = mix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [m & mask for m in mixed] == [reference(v) for v in values]


# -- a mixed batch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_mixed_batch_rows_match_rows_alone(device: torch.device) -> None:
    generator = torch.Generator().manual_seed(6)
    vocab = 700
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, top_p=0.9, logprobs=2),
        SamplingParams(temperature=0.8, repetition_penalty=1.3, frequency_penalty=0.4),
        SamplingParams(temperature=0.0, logprobs=4, presence_penalty=0.7),
        SamplingParams(temperature=1.2, min_p=0.05),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_k=20, min_tokens=30, max_tokens=64, stop_token_ids=[5]),
        SamplingParams(temperature=0.7, top_k=400, top_p=0.97),
    ]
    rows = len(params)
    logits = (torch.randn(rows, vocab, generator=generator) * 3).to(device)
    outputs = [torch.randint(0, vocab, (i * 3,), generator=generator).tolist() for i in range(rows)]
    prompts = [torch.randint(0, vocab, (10,), generator=generator).tolist() for _ in range(rows)]
    seeds = [2**63 + 11 * i for i in range(rows)]
    kw = {"eos": (0,)}
    batch = sample(logits, params, seeds=seeds, outputs=outputs, prompts=prompts, **kw)
    for i in range(rows):
        alone = sample(
            logits[i : i + 1],
            [params[i]],
            seeds=[seeds[i]],
            outputs=[outputs[i]],
            prompts=[prompts[i]],
            **kw,
        )
        assert batch.next_token_ids[i] == alone.next_token_ids[0], (i, params[i])
        if alone.logprobs is not None:
            assert torch.allclose(batch.logprobs[i], alone.logprobs[0], atol=1e-5)
            k = params[i].logprobs
            if k:
                assert torch.equal(batch.top_logprob_ids[i, :k], alone.top_logprob_ids[0, :k])
    if device.type == "cuda":  # the same draws as on CPU: the hash is device-independent
        on_cpu = sample(logits.cpu(), params, seeds=seeds, outputs=outputs, prompts=prompts, **kw)
        assert torch.equal(batch.next_token_ids.cpu(), on_cpu.next_token_ids)
