"""What each kind of pooling model answers, the refusals of the others, and the activations of
classify and score at the extremes (no overflow, no NaN)."""

from __future__ import annotations

import math

import pytest

from lmprog.runtime.models.pooling_task import (
    PoolingTask,
    class_probs,
    cosine,
    pair_score,
    refusal,
    serves,
)

EMBED = PoolingTask("embed")
CLASSIFIER = PoolingTask("classify", ("neg", "pos"))
CROSS_ENCODER = PoolingTask("classify", ("relevance",))
TAGGER = PoolingTask("token_classify", ("O", "B"))


@pytest.mark.parametrize(
    ("task", "answers"),
    [
        (None, {"generate"}),
        (EMBED, {"embed", "score"}),
        (CLASSIFIER, {"classify", "reward"}),
        (CROSS_ENCODER, {"classify", "reward", "score"}),
        (TAGGER, {"reward"}),
    ],
)
def test_each_task_answers_its_calls(task, answers) -> None:
    calls = {"generate", "embed", "classify", "score", "reward"}
    assert {c for c in calls if serves(task, c)} == answers


def test_refusals_say_what_the_model_is_and_answers() -> None:
    message = refusal(CLASSIFIER, "score", "m")
    assert "cross-encoder" in message and "2 labels ['neg', 'pos']" in message
    assert message.endswith("this model answers classify(), reward()")
    routes = refusal(TAGGER, "embed", "m", routes=True)
    assert routes.startswith("'m' is a token classification (per-token reward) model: embed")
    assert routes.endswith("this model answers /pooling")
    assert "'m' is a generation model: classify needs a classification model" in refusal(
        None, "classify", "m"
    )


def test_activations_at_the_extremes() -> None:
    assert class_probs([1000.0, 0.0, -1000.0]) == pytest.approx([1.0, 0.0, 0.0])
    assert sum(class_probs([0.3, -1.2, 2.0])) == pytest.approx(1.0)
    assert class_probs([-1000.0]) == [0.0] and class_probs([1000.0]) == [1.0]
    assert pair_score([0.0]) == 0.5
    assert pair_score([2.0]) == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert cosine([1.0, 0.0], [0.0, 0.0]) == 0.0
    assert cosine([1.0, 2.0], [2.0, 4.0]) == pytest.approx(1.0)
