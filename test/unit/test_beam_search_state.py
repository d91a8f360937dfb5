"""Beam search's bookkeeping (sampling/beam_search.py) on hand-made candidates: ranking by
cumulative logprob, EOS completing a beam, the length-penalized final ranking, the texts."""

from __future__ import annotations

import pytest

from lmprog.runtime.sampling.beam_search import BeamSearch, BeamSearchParams

EOS = 0


def decode(ids: list[int]) -> str:
    return " ".join(map(str, ids))


def test_running_beams_are_the_best_by_cumulative_logprob() -> None:
    search = BeamSearch([7, 8], BeamSearchParams(beam_width=2, max_tokens=2), [EOS])
    assert search.candidates_per_beam == 4 and search.prompts() == [[7, 8]]
    search.advance([{1: -0.1, 2: -0.5, 3: -2.0}])
    assert search.prompts() == [[7, 8, 1], [7, 8, 2]]
    # Beam [.., 2] has the better continuation: both survivors may come from one beam.
    search.advance([{4: -3.0, 5: -3.5}, {6: -0.2, 9: -0.3}])
    assert search.done
    out = search.result(decode)
    assert [s.tokens for s in out.sequences] == [[7, 8, 2, 6], [7, 8, 2, 9]]
    assert out.sequences[0].cum_logprob == pytest.approx(-0.7)
    assert [s.text for s in out.sequences] == ["2 6", "2 9"]
    assert {s.finish_reason for s in out.sequences} == {"length"}
    assert out.sequences[0].logprobs == [{1: -0.1, 2: -0.5, 3: -2.0}, {6: -0.2, 9: -0.3}]


def test_eos_completes_a_beam_and_the_final_ranking_is_length_penalized() -> None:
    params = BeamSearchParams(beam_width=2, max_tokens=3, length_penalty=1.0)
    search = BeamSearch([5], params, [EOS])
    search.advance([{EOS: -1.0, 1: -0.2, 2: -0.3}])  # [5, EOS] completes at -1.0 (1 token)
    assert len(search.complete) == 1 and search.prompts() == [[5, 1], [5, 2]]
    search.advance([{3: -0.5}, {4: -0.6}])
    search.advance([{6: -0.5}, {7: -0.5}])
    # Running: [5,1,3,6] at -1.2 / 3 = -0.4 and [5,2,4,7] at -1.4 / 3; complete -1.0 / 1.
    out = search.result(decode)
    assert [s.tokens for s in out.sequences] == [[5, 1, 3, 6], [5, 2, 4, 7]]
    # Without the length penalty the short complete beam wins.
    plain = BeamSearch([5], BeamSearchParams(2, 3, length_penalty=0.0), [EOS])
    plain.advance([{EOS: -1.0, 1: -0.2, 2: -0.3}])
    plain.advance([{3: -0.5}, {4: -0.6}])
    plain.advance([{6: -0.5}, {7: -0.5}])
    best = plain.result(decode).sequences[0]
    assert best.tokens == [5, EOS] and best.finish_reason == "stop" and best.stop_reason == EOS
    assert best.text == ""  # the EOS is not in the text


def test_ignore_eos_keeps_eos_candidates_running_and_all_ending_stops_early() -> None:
    search = BeamSearch([5], BeamSearchParams(1, 4, ignore_eos=True), [EOS])
    search.advance([{EOS: -0.1, 1: -0.2}])
    assert search.prompts() == [[5, EOS]]
    ended = BeamSearch([5], BeamSearchParams(1, 4), [EOS])
    ended.advance([{EOS: -0.1}])
    assert ended.done and ended.steps == 1  # no beam left to run
    kept = BeamSearch([5], BeamSearchParams(1, 4, include_stop_str_in_output=True), [EOS])
    kept.advance([{EOS: -0.1}])
    assert kept.result(decode).sequences[0].text == str(EOS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beam_width": 0, "max_tokens": 4}, "beam_width must be an integer >= 1, got 0"),
        ({"beam_width": 2, "max_tokens": 0}, "max_tokens must be an integer >= 1, got 0"),
        ({"beam_width": 2, "max_tokens": 4, "temperature": -1.0}, "temperature must be >= 0"),
    ],
)
def test_params_are_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BeamSearchParams(**kwargs)
