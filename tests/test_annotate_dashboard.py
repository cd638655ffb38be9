"""The dashboard's statistics on a small example worked out by hand."""

from __future__ import annotations

import math

import pytest

from posttrain.annotate.dashboard import hourly_pay, left_share, pool_stats, summarise, wilson_share
from posttrain.annotate.pairs import PairRecord
from posttrain.annotate.store import Label


def label(pair: str, who: str, choice: str, left: str, seconds: float) -> Label:
    return Label(pair, who, choice, left, None, "", seconds, 0.0, pair.startswith("g"))


PAIRS = [PairRecord(f"p{i}", f"q{i}", f"a{i}", f"b{i}", None) for i in range(1, 7)] + [
    PairRecord("g1", "q", "good", "bad", "a"),
    PairRecord("g2", "q", "bad", "good", "b"),
]
# (pair, annotator, choice, left, seconds); "chose left" means choice == left
LABELS = [
    label("p1", "alice", "a", "a", 10),  # left
    label("p2", "alice", "b", "a", 20),  # right
    label("p3", "alice", "a", "a", 30),  # left
    label("p4", "alice", "a", "b", 40),  # right
    label("p5", "alice", "b", "b", 50),  # left
    label("g1", "alice", "a", "a", 60),  # left, correct (gold a)
    label("g2", "alice", "a", "b", 70),  # right, wrong (gold b)
    label("p1", "bob", "a", "b", 5),  # right
    label("p2", "bob", "b", "b", 5),  # left
    label("p3", "bob", "b", "a", 10),  # right
    label("p4", "bob", "a", "a", 20),  # left
    label("p5", "bob", "a", "a", 100),  # left
    label("p1", "carol", "tie", "a", 30),
    label("p6", "carol", "both_bad", "b", 90),
]


def test_wilson_interval_by_hand():
    # z = 1.959964, z² = 3.841459; p = 4/7, n = 7: 1 + z²/n = 1.548780,
    # centre = (p + z²/2n) / 1.548780 = 0.546120, half = z / 1.548780 · sqrt(p(1−p)/n + z²/4n²) = 0.295657
    share = wilson_share(4, 7)
    assert share.value == pytest.approx(4 / 7)
    assert (share.low, share.high) == pytest.approx((0.250463, 0.841777), abs=1e-5)
    assert wilson_share(0, 0).value is None


def test_left_share_counts_a_b_choices_only():
    alice = [row for row in LABELS if row.annotator == "alice"]
    assert (left_share(alice).k, left_share(alice).n) == (4, 7)
    carol = [row for row in LABELS if row.annotator == "carol"]
    assert left_share(carol).n == 0 and left_share(carol).value is None


def test_hourly_pay_is_pay_times_3600_over_the_median():
    assert hourly_pay(0.10, 40.0) == pytest.approx(9.0)
    assert hourly_pay(None, 40.0) is None and hourly_pay(0.1, 0.0) is None and hourly_pay(0.1, None) is None


def test_pool_agreement_and_alpha_by_hand():
    # a/b labels on pairs with 2+: p1 (a, a), p2 (b, b), p3 (a, b), p4 (a, a), p5 (b, a); carol's tie is left out.
    # Raw agreement: 3 agreeing couples (p1, p2, p4) of 5 = 0.6.
    # Krippendorff: coincidences o_aa = 4, o_bb = 2, o_ab = 2; n_a = 6, n_b = 4, n = 10;
    # α = 1 − (n − 1) o_ab / (n_a n_b) = 1 − 9 · 2 / 24 = 0.25.
    pool = pool_stats(LABELS)
    assert (pool.agreement, pool.agreement_pairs, pool.agreement_couples) == (pytest.approx(0.6), 5, 5)
    assert (pool.alpha, pool.alpha_pairs) == (pytest.approx(0.25), 5)


def test_pool_needs_five_pairs_with_two_labels():
    pool = pool_stats([row for row in LABELS if row.pair_id != "p5"])
    assert (pool.agreement, pool.agreement_pairs, pool.alpha, pool.alpha_pairs) == (None, 4, None, 4)
    assert pool_stats([]).agreement is None
    one_side = [label(f"p{i}", who, "a", "a", 1) for i in range(1, 6) for who in ("x", "y")]
    assert math.isnan(pool_stats(one_side).alpha) and pool_stats(one_side).agreement == 1.0


def test_summary_by_hand():
    stats = summarise(LABELS, PAIRS, ["alice", "bob", "carol", "dave"], overlap=2, pay_per_label=0.10)
    alice, bob, carol, dave = stats.annotators
    # alice: 7 labels, median of 10..70 s = 40 s -> 0.10 · 3600 / 40 = 9.00 per hour; left 4/7;
    # known answers: g1 right, g2 wrong -> 1/2, Wilson [0.094531, 0.905469]
    assert (alice.labels, alice.median_seconds, alice.hourly_pay) == (7, 40, pytest.approx(9.0))
    assert (alice.left_share.k, alice.left_share.n) == (4, 7)
    assert (alice.gold.accuracy, alice.gold.n) == (0.5, 2)
    assert (alice.gold.low, alice.gold.high) == pytest.approx((0.094531, 0.905469), abs=1e-5)
    # bob: median of 5, 5, 10, 20, 100 = 10 s -> 36.00 per hour; left 3/5; no known-answer pair
    assert (bob.labels, bob.median_seconds, bob.hourly_pay) == (5, 10, pytest.approx(36.0))
    assert (bob.left_share.k, bob.left_share.n, bob.gold.n, bob.gold.accuracy) == (3, 5, 0, None)
    # carol: a tie and a both-bad: 2 labels, median 60 s -> 6.00 per hour, no a/b statistics
    assert (carol.labels, carol.median_seconds, carol.hourly_pay, carol.left_share.n) == (2, 60, pytest.approx(6.0), 0)
    assert (dave.labels, dave.median_seconds, dave.hourly_pay) == (0, None, None)
    # overlap 2: p1 (3 labels), p2..p5 (2) complete, p6 (1) not; g1, g2 are checks
    assert (stats.pairs_complete, stats.pairs_total, stats.checks, stats.labels) == (5, 6, 2, 14)
    assert stats.pool.agreement == pytest.approx(0.6)


def test_summary_without_pay_or_labels():
    stats = summarise([], PAIRS, ["alice"], overlap=3, pay_per_label=None)
    assert stats.annotators[0].hourly_pay is None and stats.pairs_complete == 0 and stats.labels == 0
    assert summarise(LABELS, PAIRS, [], 2, None).annotators[0].name == "alice"  # labelled, then removed from names
