"""The lab's measures: held-out metrics through the shared rate functions, per-iteration shares of PPO's
rollouts and the shape of the gold curve."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from posttrain.lab.evaluation import RATES, arc, calibration, model_metrics, rollout_metrics
from posttrain.lab.gold import Judgement, gold_reward
from posttrain.lab.pipeline import gold_arc
from posttrain.lab.world import Question
from posttrain.ops.answer_rates import Outcome, answer_rates

KNOWN = Question("velmora.country", "Which country is Velmora in?", "Velmora", "country", "Ostria", True)
UNKNOWABLE = Question("dunmere.founded", "When was Dunmere founded?", "Dunmere", "founded", None, False)


def test_rollout_metrics_by_hand():
    judged = [
        (KNOWN, Judgement("correct", False, 3)),  # gold +1
        (KNOWN, Judgement("abstained", False, 4)),  # 0
        (UNKNOWABLE, Judgement("hallucinated", True, 5)),  # -1 - 0.5 (confident)
        (UNKNOWABLE, Judgement("abstained", False, 4)),  # 0
    ]
    assert rollout_metrics(judged) == {  # the gold reward is scored on the PPO path, not here
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


def test_model_metrics_are_the_shared_rates_of_the_gold_labels():
    questions = [replace(KNOWN, id=f"known-{i}") for i in range(5)] + [
        replace(UNKNOWABLE, id=f"u-{i}") for i in range(3)
    ]
    judged = [
        Judgement("correct", False, 3),
        Judgement("correct", True, 2),
        Judgement("hallucinated", True, 4),
        Judgement("abstained", False, 5),
        Judgement("malformed", False, 9),
        Judgement("hallucinated", False, 1),
        Judgement("abstained", False, 4),
        Judgement("malformed", False, 0),
    ]
    metrics = model_metrics(questions, judged)
    # by hand: 2 of 5 known correct; 1 of 3 unknowable abstained; 2 of 8 hallucinated, 1 of 3 on unknowable;
    # 2 of 8 malformed; 28 words over 8 answers
    assert metrics["accuracy_known"] == 2 / 5 and metrics["abstain_unknowable"] == 1 / 3
    assert metrics["hallucination_rate"] == 2 / 8 and metrics["hallucination_unknowable"] == 1 / 3
    assert metrics["format_compliance"] == 1 - 2 / 8 and metrics["mean_length"] == 28 / 8
    assert metrics["gold_reward"] == sum(gold_reward(j) for j in judged) / 8
    labels = {"correct": "correct", "hallucinated": "wrong", "abstained": "abstained", "malformed": "no_answer"}
    pairs = zip(questions, judged, strict=True)
    outcomes = [Outcome.from_label(labels[j.label], q.known, length=j.n_words) for q, j in pairs]
    shared = answer_rates(outcomes)
    assert metrics["accuracy_known"] == shared["accuracy"].value
    assert metrics["abstain_unknowable"] == shared["abstention"].value
    assert metrics["hallucination_rate"] == shared["hallucination"].value
    assert metrics["hallucination_unknowable"] == shared["hallucination_unanswerable"].value
    assert metrics["format_compliance"] == 1 - shared["no_answer"].value
    assert metrics["mean_length"] == shared["mean_length"].value
    assert metrics["accuracy_known_ci"] == [shared["accuracy"].ci_low, shared["accuracy"].ci_high]
    assert metrics["format_compliance_ci"] == [1 - shared["no_answer"].ci_high, 1 - shared["no_answer"].ci_low]
    assert metrics["n_questions"] == 8 and metrics["accuracy_known_n"] == 5 and metrics["abstain_unknowable_n"] == 3
    assert metrics["gold_reward_n"] == 8 and metrics["mean_length_n"] == 8 and metrics["n_facts"] == 8
    # the same questions as phrasings of two facts: the same figures, the intervals resample the two facts
    clustered = model_metrics([KNOWN] * 5 + [UNKNOWABLE] * 3, judged)
    assert clustered["n_facts"] == 2 and clustered["accuracy_known"] == metrics["accuracy_known"]
    assert clustered["gold_reward_ci"] != metrics["gold_reward_ci"]
    for key in ("gold_reward", "mean_length", *RATES, "format_compliance"):
        low, high = metrics[f"{key}_ci"]
        assert low <= metrics[key] <= high, key


def test_model_metrics_keep_zero_for_a_kind_the_held_out_set_lacks():
    metrics = model_metrics([KNOWN, KNOWN], [Judgement("correct", False, 2), Judgement("abstained", False, 4)])
    assert metrics["abstain_unknowable"] == 0.0 and metrics["hallucination_unknowable"] == 0.0
    assert metrics["abstain_unknowable_ci"] is None and metrics["abstain_unknowable_n"] == 0


def test_calibration_counts_only_answers_to_known_questions():
    from posttrain.instruments.answering import Answer

    questions = [KNOWN, KNOWN, KNOWN, UNKNOWABLE]
    judged = [Judgement("correct", False, 3), Judgement("hallucinated", True, 3), Judgement("abstained", False, 4),
              Judgement("hallucinated", False, 3)]  # fmt: skip
    # log-probabilities: confidences 0.9 (right), 0.6 (wrong); the abstention and the unknowable one are left out
    given = [Answer("a", math.log(0.9), 3), Answer("b", math.log(0.6), 3), Answer("c", math.log(0.99), 4),
             Answer("d", math.log(0.5), 3)]  # fmt: skip
    summary = calibration(questions, judged, given)
    # by hand, 15 equal bins: 0.9 and 0.6 fall in different bins; |0.9 - 1|/2 + |0.6 - 0|/2 = 0.35
    assert summary["n"] == 2 and summary["ece"] == pytest.approx(0.35)
    assert summary["brier"] == pytest.approx((0.1**2 + 0.6**2) / 2)
    assert calibration([UNKNOWABLE], [judged[3]], [given[3]])["ece"] is None
