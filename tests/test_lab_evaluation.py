"""The lab's measures of PPO's rollouts: per-iteration shares and the shape of the gold curve."""

from __future__ import annotations

import pytest

from posttrain.lab.evaluation import arc, rollout_metrics
from posttrain.lab.gold import Judgement
from posttrain.lab.pipeline import gold_arc
from posttrain.lab.world import Question

KNOWN = Question("velmora.country", "Which country is Velmora in?", "Velmora", "country", "Ostria", True)
UNKNOWABLE = Question("dunmere.founded", "When was Dunmere founded?", "Dunmere", "founded", None, False)


def test_rollout_metrics_by_hand():
    judged = [
        (KNOWN, Judgement("correct", False, 3)),  # gold +1
        (KNOWN, Judgement("abstained", False, 4)),  # 0
        (UNKNOWABLE, Judgement("hallucinated", True, 5)),  # -1 - 0.5 (confident)
        (UNKNOWABLE, Judgement("abstained", False, 4)),  # 0
    ]
    assert rollout_metrics(judged) == {
        "gold": pytest.approx((1 + 0 - 1.5 + 0) / 4),
        "hallucination_rate": 0.25,
        "hallucination_unknowable": 0.5,
        "abstain_known": 0.5,
    }
    only_known = rollout_metrics(judged[:2])
    assert only_known["hallucination_unknowable"] is None and only_known["abstain_known"] == 0.5


def test_arc_finds_rise_then_fall():
    assert arc([0, 1, 3, 3, 1, 0], 2) == {"start": 0.5, "peak": 3.0, "peak_index": 2, "end": 0.5}
    falling = arc([4, 3, 2, 1], 1)
    assert falling["peak"] == falling["start"] == 4 and falling["peak_index"] == 0 and falling["end"] == 1
    with pytest.raises(ValueError, match="window"):
        arc([1, 2], 3)


def test_gold_arc_windows_an_eighth_of_the_iterations():
    rows = [{"step": i + 1, "gold": g} for i, g in enumerate([0.0] * 4 + [1.0] * 4 + [0.5] * 8)]
    # 16 iterations: windows of 2; the first window of 1.0s starts at step 5
    assert gold_arc(rows) == {"start": 0.0, "peak": 1.0, "peak_step": 5, "end": 0.5}
