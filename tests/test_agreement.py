"""Agreement statistics against hand-worked values, and Dawid–Skene on a simulated annotator pool."""

from __future__ import annotations

import math

import numpy as np
import pytest

from posttrain.ops.agreement import (
    AnnotatorAccuracy,
    accuracy_on_gold,
    cohen_kappa_by_pair,
    dawid_skene,
    flag_unreliable,
    fleiss_kappa,
    krippendorff_alpha,
    make_labels,
    raw_agreement,
)


def labels_from_votes(votes: list[tuple[int, int]]):
    """One pair per (votes for A, votes for B), labelled by annotators r0, r1, ... in that order."""
    pair_ids, annotator_ids, choices = [], [], []
    for pair, (for_a, for_b) in enumerate(votes):
        for rater, choice in enumerate([0] * for_a + [1] * for_b):
            pair_ids.append(f"p{pair}")
            annotator_ids.append(f"r{rater}")
            choices.append(choice)
    return make_labels(pair_ids, annotator_ids, choices)


# 5 pairs x 3 raters, (votes for A, votes for B) per pair.
FLEISS_VOTES = [(0, 3), (3, 0), (1, 2), (2, 1), (0, 3)]


def test_cohen_kappa_two_annotators_ten_pairs():
    x = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    y = [1, 1, 1, 1, 1, 0, 0, 0, 0, 1]
    # Agree on pairs 0-4 (both B) and 6-8 (both A): p_o = 8/10.
    # x chose B 6/10 times, y 6/10: p_e = 0.6·0.6 + 0.4·0.4 = 0.52.
    # κ = (0.8 − 0.52) / (1 − 0.52) = 0.28 / 0.48 = 7/12.
    labels = make_labels(list(range(10)) * 2, ["x"] * 10 + ["y"] * 10, x + y)
    assert cohen_kappa_by_pair(labels) == {("x", "y"): (pytest.approx(7 / 12), 10)}


def test_raw_agreement_pools_couples():
    labels = labels_from_votes(FLEISS_VOTES + [(1, 0)])
    # Each 3-label pair holds 3 couples; unanimous pairs agree on 3, a 2–1 split on 1 (the couple
    # of the two-vote side). 3 + 3 + 1 + 1 + 3 = 11 of 15 couples; the 1-label pair has no couple.
    result = raw_agreement(labels)
    assert (result.value, result.n_pairs, result.n_couples) == (pytest.approx(11 / 15), 5, 15)


def test_fleiss_kappa_five_pairs_three_raters():
    # P_i = (n_A(n_A − 1) + n_B(n_B − 1)) / (3·2): 1, 1, 1/3, 1/3, 1; mean P = 11/15.
    # p_B = (3 + 0 + 2 + 1 + 3) / 15 = 0.6, p_A = 0.4: P_e = 0.36 + 0.16 = 0.52.
    # κ = (11/15 − 0.52) / 0.48 = (16/75) / (12/25) = 4/9.
    # A pair with 2 labels and one with 1 are left out: m = 3 is the most common count.
    result = fleiss_kappa(labels_from_votes(FLEISS_VOTES + [(1, 1), (0, 1)]))
    assert result.value == pytest.approx(4 / 9)
    assert (result.n_pairs, result.raters_per_pair) == (5, 3)


def test_fleiss_kappa_ties_go_to_more_raters():
    result = fleiss_kappa(labels_from_votes([(1, 1)] * 2 + [(1, 2)] * 2), min_pairs=1)
    assert (result.n_pairs, result.raters_per_pair) == (2, 3)


def test_krippendorff_alpha_from_the_coincidence_matrix():
    votes = [*FLEISS_VOTES, (1, 1), (0, 1)]
    # Coincidences: a unit with m values adds n_A·n_B / (m − 1) to o_AB. Only the split units do:
    # (1, 2) -> 2/2, (2, 1) -> 2/2, (1, 1) -> 1/1, so o_AB = 3. The 1-label unit is not pairable.
    # n_A = 0 + 3 + 1 + 2 + 0 + 1 = 7, n_B = 3 + 0 + 2 + 1 + 3 + 1 = 10, n = 17.
    # α = 1 − (n − 1) o_AB / (n_A n_B) = 1 − 16·3 / 70 = 11/35.
    result = krippendorff_alpha(labels_from_votes(votes))
    assert result.value == pytest.approx(11 / 35)
    assert result.n_pairs == 6


def test_too_few_overlapping_labels_gives_none_and_the_count():
    # Two pairs labelled twice, three labelled once.
    labels = make_labels(
        ["p0", "p0", "p1", "p1", "p2", "p3", "p4"], ["x", "y", "x", "y", "x", "y", "z"], [1, 1, 0, 1, 1, 0, 1]
    )
    assert cohen_kappa_by_pair(labels) == {("x", "y"): (None, 2)}
    fleiss, alpha = fleiss_kappa(labels), krippendorff_alpha(labels)
    assert (fleiss.value, fleiss.n_pairs, fleiss.min_pairs) == (None, 2, 5)
    assert (alpha.value, alpha.n_pairs, alpha.min_pairs) == (None, 2, 5)
    assert raw_agreement(labels).n_pairs == 2
    single = make_labels(["p0", "p1"], ["x", "y"], [0, 1])
    assert (raw_agreement(single).value, raw_agreement(single).n_pairs) == (None, 0)
    assert (fleiss_kappa(single).value, fleiss_kappa(single).n_pairs) == (None, 0)


def test_one_sided_labels_give_nan_not_an_error():
    labels = labels_from_votes([(0, 3)] * 5)
    assert raw_agreement(labels).value == 1.0
    assert math.isnan(fleiss_kappa(labels).value)
    assert math.isnan(krippendorff_alpha(labels).value)
    assert math.isnan(cohen_kappa_by_pair(labels)[("r0", "r1")][0])


@pytest.mark.parametrize(
    ("pairs", "annotators", "choices", "message"),
    [
        (["p0"], ["x", "y"], [0, 1], "pair ids"),
        ([], [], [], "no labels"),
        (["p0", "p1"], ["x", "x"], [0, 2], "label 1: choice"),
        (["p0", "p1"], ["x", "x"], [0, 0.5], "label 1: choice"),
        (["p0", "p1", "p0"], ["x", "x", "x"], [0, 1, 1], "label 2: annotator 'x' labelled pair 'p0' twice"),
    ],
)
def test_malformed_labels_raise(pairs, annotators, choices, message):
    with pytest.raises(ValueError, match=message):
        make_labels(pairs, annotators, choices)


def test_accuracy_on_gold_with_wilson_interval():
    labels = make_labels(["p0", "p1", "p2", "p3", "p4", "p0"], ["x", "x", "x", "x", "x", "y"], [1, 0, 1, 1, 1, 0])
    x, y = accuracy_on_gold(labels, {"p0": 1, "p1": 0, "p2": 1, "p3": 0, "unlabelled": 1})
    # x: 3 of 4 gold pairs right (p4 has no gold). Wilson, z = 1.96: centre (0.75 + z²/8) / (1 + z²/4)
    # = 1.23018 / 1.96036 = 0.62753; half-width z·sqrt(0.75·0.25/4 + z²/64) / 1.96036 = 0.32689.
    assert (x.accuracy, x.n) == (0.75, 4)
    assert (x.low, x.high) == (pytest.approx(0.30064, abs=1e-4), pytest.approx(0.95441, abs=1e-4))
    assert (y.annotator, y.accuracy, y.n) == ("y", 0.0, 1)
    assert accuracy_on_gold(labels, {"p9": 1})[0] == AnnotatorAccuracy("x", None, 0, None, None)
    with pytest.raises(ValueError, match="gold of pair 'p0'"):
        accuracy_on_gold(labels, {"p0": "B"})


def test_flag_unreliable_uses_the_interval_and_the_pool_median():
    pool = [
        AnnotatorAccuracy("good", 0.9, 100, 0.83, 0.95),
        AnnotatorAccuracy("fine", 0.85, 100, 0.77, 0.91),
        AnnotatorAccuracy("ok", 0.8, 100, 0.71, 0.87),
        AnnotatorAccuracy("trailing", 0.7, 300, 0.65, 0.74),
        AnnotatorAccuracy("bad", 0.5, 100, 0.40, 0.60),
        AnnotatorAccuracy("unsure", 0.5, 4, 0.15, 0.85),  # low, but too few labels to tell
        AnnotatorAccuracy("unknown", None, 0, None, None),  # skipped, and not part of the median
    ]
    # Median of 0.9, 0.85, 0.8, 0.7, 0.5, 0.5 is 0.75. Margin 0.1: flag an upper end below 0.65,
    # only "bad" (0.60). Margin 0: below 0.75, "trailing" (0.74) too.
    assert flag_unreliable(pool) == ["bad"]
    assert flag_unreliable(pool, margin=0.0) == ["trailing", "bad"]


PLANTED = [0.9, 0.85, 0.8, 0.75, 0.7, 0.5]


def simulated_pool(seed: int, n_pairs: int = 1000, per_pair: int = 3):
    """Each pair's better side is a fair coin; 3 distinct annotators label it, each right with its
    planted accuracy."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n_pairs)
    pair_ids, annotator_ids, choices = [], [], []
    for pair in range(n_pairs):
        for annotator in rng.choice(len(PLANTED), per_pair, replace=False):
            right = rng.random() < PLANTED[annotator]
            pair_ids.append(pair)
            annotator_ids.append(f"a{annotator}")
            choices.append(int(truth[pair]) if right else 1 - int(truth[pair]))
    return make_labels(pair_ids, annotator_ids, choices), truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dawid_skene_recovers_planted_accuracies(seed):
    labels, truth = simulated_pool(seed)
    result = dawid_skene(labels)
    assert result.converged
    estimated = {acc.annotator: acc.accuracy for acc in result.accuracy}
    for annotator, planted in enumerate(PLANTED):
        assert estimated[f"a{annotator}"] == pytest.approx(planted, abs=0.07)
    assert flag_unreliable(result.accuracy) == ["a5"]  # the random annotator, and only it
    # Dawid–Skene weighs each vote by the annotator's estimated reliability: at least as often
    # right as the plain majority of three.
    order = np.array([int(p) for p in labels.pairs])  # Labels.pairs is in first-seen order
    majority = (np.bincount(labels.pair, weights=labels.choice) >= 2).astype(int)
    ds = (result.posterior_b > 0.5).astype(int)
    assert (ds == truth[order]).mean() >= (majority == truth[order]).mean()


def test_dawid_skene_is_deterministic_and_smoothed():
    labels, _ = simulated_pool(0, n_pairs=60)
    first, second = dawid_skene(labels, iterations=50), dawid_skene(labels, iterations=50)
    np.testing.assert_array_equal(first.posterior_b, second.posterior_b)
    # A single perfect annotator agreeing with itself: no log 0, posteriors strictly inside (0, 1).
    perfect = dawid_skene(make_labels([0, 1, 2], ["x"] * 3, [0, 1, 1]))
    assert np.all((perfect.posterior_b > 0) & (perfect.posterior_b < 1))
    np.testing.assert_allclose(perfect.confusion["x"].sum(axis=1), 1.0)
