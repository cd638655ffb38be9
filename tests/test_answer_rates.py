"""Accuracy, abstention and hallucination rates on a hand-labelled toy set, and their bootstrap intervals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from posttrain.ops.answer_rates import Outcome, Rate, answer_rates, bootstrap_mean, cluster_mean

# (answerable, label, length in words)
TOY = [
    (True, "correct", 3),
    (True, "correct", 5),
    (True, "wrong", 4),  # a hallucination
    (True, "abstained", 4),
    (True, "no_answer", 0),
    (True, "correct", 2),
    (False, "abstained", 3),
    (False, "wrong", 6),  # a hallucination
    (False, "abstained", 2),
    (False, "wrong", 1),  # a hallucination
]


def toy_outcomes() -> list[Outcome]:
    return [Outcome.from_label(label, answerable, length=n) for answerable, label, n in TOY]


def test_rates_on_the_toy_set():
    rates = answer_rates(toy_outcomes())
    expected = {
        "accuracy": (3 / 6, 6),  # 3 correct of 6 answerable
        "abstention": (2 / 4, 4),  # 2 abstained of 4 unanswerable
        "abstention_answerable": (1 / 6, 6),
        "hallucination": (3 / 10, 10),  # 1 wrong answerable + 2 stated unanswerable, of all 10
        "hallucination_unanswerable": (2 / 4, 4),
        "no_answer": (1 / 10, 10),
        "mean_length": (30 / 10, 10),  # 3+5+4+4+0+2+3+6+2+1 = 30
    }
    assert set(rates) == set(expected)
    for name, (value, n) in expected.items():
        rate = rates[name]
        assert (rate.value, rate.n) == (value, n), name
        assert rate.ci_low <= rate.value <= rate.ci_high, name
        assert rate.ci_low < rate.ci_high, name  # every one of these samples has spread


def test_rates_without_questions_of_a_kind_are_none():
    rates = answer_rates([Outcome.from_label("correct", True, length=1)])
    assert rates["abstention"].as_dict() == {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    assert rates["accuracy"].as_dict() == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 1}


def test_outcome_labels_and_consistency():
    assert [o.label for o in toy_outcomes()] == [label for _, label, _ in TOY]
    wrong = Outcome.from_label("wrong", False)
    assert wrong.stated and wrong.hallucinated and not wrong.correct
    assert not Outcome.from_label("abstained", True).hallucinated
    with pytest.raises(ValueError, match="answerable"):
        Outcome(answerable=False, stated=True, correct=True, abstained=False)
    with pytest.raises(ValueError, match="not both"):
        Outcome(answerable=True, stated=True, correct=False, abstained=True)
    with pytest.raises(ValueError, match="unknown label"):
        Outcome.from_label("hallucinated", True)


def test_bootstrap_is_reproducible_and_about_as_wide_as_the_normal_interval():
    values = np.array([1.0, 0.0] * 50)  # p = 0.5, n = 100: normal interval ± 1.96·0.05 = ± 0.098
    first, again = bootstrap_mean(values, seed=3), bootstrap_mean(values, seed=3)
    assert first == again
    assert first.value == 0.5 and first.n == 100
    assert first.ci_high - first.ci_low == pytest.approx(0.196, abs=0.03)
    assert bootstrap_mean(values, seed=4).ci_low == pytest.approx(first.ci_low, abs=0.03)


def test_degenerate_samples_give_a_point_interval_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy warns on degenerate samples; none may reach the user
        assert bootstrap_mean(np.zeros(7)).as_dict() == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 7}
        assert bootstrap_mean(np.array([1.0])).as_dict() == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 1}
        assert bootstrap_mean(np.array([])).n == 0
        for sample in ([0.0, 1.0], [0.0] * 30 + [1.0], [1.0, 1.0, 0.0]):
            rate = bootstrap_mean(np.array(sample))
            assert 0.0 <= rate.ci_low <= rate.value <= rate.ci_high <= 1.0


def test_cluster_bootstrap_resamples_facts_not_phrasings():
    values = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])  # one answer per fact
    single = cluster_mean(values, list(range(8)))
    assert single == bootstrap_mean(values)  # one question a fact: the plain bootstrap, resample for resample
    # each fact asked three times, answered alike: the same share, and the same interval (three phrasings
    # are one piece of evidence), where the plain bootstrap, counting 24 questions, narrows it
    tripled = np.repeat(values, 3)
    facts = np.repeat(np.arange(8), 3).tolist()
    clustered, naive = cluster_mean(tripled, facts), bootstrap_mean(tripled)
    assert clustered.value == naive.value == 5 / 8 and clustered.n == 24
    assert (clustered.ci_low, clustered.ci_high) == pytest.approx((single.ci_low, single.ci_high))
    assert naive.ci_high - naive.ci_low < clustered.ci_high - clustered.ci_low
    # the rates take the clusters through answer_rates
    outcomes = [Outcome.from_label("correct" if v else "wrong", True) for v in tripled]
    assert answer_rates(outcomes, clusters=facts)["accuracy"] == clustered
    assert cluster_mean(np.array([1.0, 0.0]), ["a", "a"]) == Rate(0.5, 0.5, 0.5, 2)  # one fact: no spread to resample
    with pytest.raises(ValueError, match="2 values but 1 cluster labels"):
        cluster_mean(np.array([1.0, 0.0]), ["a"])
