"""The statistics of the admin dashboard of ``posttrain annotate serve``: pure functions over the labels.

Per annotator: how many labels, how long a label takes (median seconds) and, with a pay per label,
the effective hourly pay that implies; the share of their a/b choices that went to the answer
shown on the left (sides are a fair coin per assignment, so a share far from 0.5 is position
bias); their accuracy on known-answer pairs. For the pool: raw pairwise agreement and
Krippendorff's α over the a/b labels, and how many pairs have their full overlap of labels.

Ties and "both bad" labels count as labels (and toward overlap) but not in the a/b statistics.
Intervals are Wilson's score interval at 95% (Wilson 1927, "Probable Inference, the Law of
Succession, and Statistical Inference"); agreement and α come from ``posttrain.ops.agreement``
(Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability").
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from statsmodels.stats.proportion import proportion_confint

from posttrain.annotate.pairs import PairRecord
from posttrain.annotate.store import Label
from posttrain.ops.agreement import (
    AnnotatorAccuracy,
    Labels,
    Statistic,
    accuracy_on_gold,
    krippendorff_alpha,
    make_labels,
    raw_agreement,
)

MIN_PAIRS = 5  # pairs with 2+ a/b labels needed before agreement and α are shown


@dataclass(frozen=True)
class Share:
    """k of n with the Wilson 95% interval [low, high]; value, low and high are None when n = 0."""

    k: int
    n: int
    value: float | None
    low: float | None
    high: float | None


@dataclass(frozen=True)
class AnnotatorStats:
    name: str
    labels: int  # every label, ties and both_bad included
    median_seconds: float | None  # None without labels
    hourly_pay: float | None  # pay_per_label × 3600 / median_seconds; None without a pay or a median > 0
    left_share: Share  # a/b choices that picked the answer shown on the left
    gold: AnnotatorAccuracy  # a/b labels on known-answer pairs that picked the known better answer


@dataclass(frozen=True)
class PoolStats:
    agreement: float | None  # share of agreeing annotator couples (None: fewer than MIN_PAIRS pairs)
    agreement_pairs: int  # pairs with 2+ a/b labels
    agreement_couples: int  # annotator couples on those pairs
    alpha: float | None  # Krippendorff's α (None: too few pairs; nan: only one side ever chosen)
    alpha_pairs: int
    min_pairs: int


@dataclass(frozen=True)
class Dashboard:
    annotators: list[AnnotatorStats]
    pool: PoolStats
    labels: int
    pairs_complete: int  # pairs without gold that hold ``overlap`` labels or more
    pairs_total: int  # pairs without gold
    checks: int  # known-answer pairs (with gold)


def wilson_share(k: int, n: int) -> Share:
    """k / n with Wilson's 95% score interval: (p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n)."""
    if n == 0:
        return Share(k, 0, None, None, None)
    low, high = proportion_confint(k, n, alpha=0.05, method="wilson")
    return Share(k, n, k / n, float(low), float(high))


def left_share(labels: list[Label]) -> Share:
    """Among a/b labels, the share that chose the answer shown on the left (``choice == left``)."""
    decided = [label for label in labels if label.choice in ("a", "b")]
    return wilson_share(sum(label.choice == label.left for label in decided), len(decided))


def hourly_pay(pay_per_label: float | None, median_seconds: float | None) -> float | None:
    """Effective pay per hour = pay per label × 3600 / median seconds per label (an estimate: the
    median ignores breaks and slow outliers); None without a pay or a positive median."""
    if pay_per_label is None or median_seconds is None or median_seconds <= 0:
        return None
    return pay_per_label * 3600.0 / median_seconds


def ab_labels(labels: list[Label]) -> Labels | None:
    """The a/b labels coded for ``posttrain.ops.agreement`` (0: response_a, 1: response_b); None when none."""
    decided = [label for label in labels if label.choice in ("a", "b")]
    if not decided:
        return None
    return make_labels([label.pair_id for label in decided], [label.annotator for label in decided],
                       [int(label.choice == "b") for label in decided])  # fmt: skip


def pool_stats(labels: list[Label]) -> PoolStats:
    """Raw pairwise agreement and Krippendorff's α over the a/b labels, each with the pairs it rests on."""
    coded = ab_labels(labels)
    if coded is None:
        return PoolStats(None, 0, 0, None, 0, MIN_PAIRS)
    agreement = raw_agreement(coded, min_pairs=MIN_PAIRS)
    alpha: Statistic = krippendorff_alpha(coded, min_pairs=MIN_PAIRS)
    return PoolStats(agreement.value, agreement.n_pairs, agreement.n_couples, alpha.value, alpha.n_pairs, MIN_PAIRS)


def gold_accuracy(labels: list[Label], pairs: list[PairRecord], names: list[str]) -> dict[str, AnnotatorAccuracy]:
    """Per annotator name, the accuracy of their a/b labels on pairs with gold (n = 0 when none)."""
    found = {name: AnnotatorAccuracy(name, None, 0, None, None) for name in names}
    coded = ab_labels(labels)
    if coded is not None:
        gold = {pair.id: int(pair.gold == "b") for pair in pairs if pair.gold is not None}
        found.update({acc.annotator: acc for acc in accuracy_on_gold(coded, gold)})
    return found


def summarise(
    labels: list[Label], pairs: list[PairRecord], names: list[str], overlap: int, pay_per_label: float | None
) -> Dashboard:
    """Everything the dashboard shows. ``names``: every annotator (also those without labels), in order;
    an annotator who labelled but is missing from ``names`` is appended."""
    names = list(dict.fromkeys([*names, *(label.annotator for label in labels)]))
    accuracy = gold_accuracy(labels, pairs, names)
    rows = []
    for name in names:
        own = [label for label in labels if label.annotator == name]
        median = statistics.median(label.seconds for label in own) if own else None
        rows.append(
            AnnotatorStats(name, len(own), median, hourly_pay(pay_per_label, median), left_share(own), accuracy[name])
        )
    regular = {pair.id for pair in pairs if pair.gold is None}
    per_pair: dict[str, int] = {}
    for label in labels:
        per_pair[label.pair_id] = per_pair.get(label.pair_id, 0) + 1
    complete = sum(per_pair.get(pair_id, 0) >= overlap for pair_id in regular)
    return Dashboard(rows, pool_stats(labels), len(labels), complete, len(regular), len(pairs) - len(regular))
