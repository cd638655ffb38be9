"""Agreement and reliability of pairwise preference labels: do the annotators agree, and who is right?

A label says which of two answers to a prompt an annotator preferred: choice 0 when answer A
was preferred, 1 when answer B was. Ties are excluded by the caller before these functions see
the labels (a tie is a third category that the two-class statistics below cannot hold). One
preference pair may be labelled by several annotators; an annotator labels a pair at most once.

Every chance-corrected statistic here is (observed agreement − chance agreement) / (1 − chance
agreement); it is undefined (nan) when every label picks the same side, since chance agreement
is then 1. When too few pairs overlap for a statistic, its value is None and the count of pairs
found comes with it, so that the caller can say how many are needed; ValueError is only for
malformed input.

Sources: Cohen 1960, "A Coefficient of Agreement for Nominal Scales"; Fleiss 1971, "Measuring
Nominal Scale Agreement Among Many Raters"; Krippendorff 2011, "Computing Krippendorff's
Alpha-Reliability"; Dawid and Skene 1979, "Maximum Likelihood Estimation of Observer Error-Rates
Using the EM Algorithm"; Wilson 1927, "Probable Inference, the Law of Succession, and Statistical
Inference".
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import krippendorff
import numpy as np
from scipy.special import logsumexp
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats import inter_rater
from statsmodels.stats.proportion import proportion_confint


@dataclass(frozen=True)
class Labels:
    """Preference labels as integer codes. ``pairs`` and ``annotators`` hold the original ids in
    first-seen order; ``pair[i]`` and ``annotator[i]`` index into them for label i."""

    pairs: tuple[Hashable, ...]
    annotators: tuple[Hashable, ...]
    pair: np.ndarray  # (n,) int
    annotator: np.ndarray  # (n,) int
    choice: np.ndarray  # (n,) int, 0 = A preferred, 1 = B preferred


def _codes(ids: Sequence[Hashable]) -> tuple[tuple[Hashable, ...], np.ndarray]:
    """Distinct ids in first-seen order, and each id's index among them."""
    index: dict[Hashable, int] = {}
    codes = np.array([index.setdefault(key, len(index)) for key in ids], dtype=np.int64)
    return tuple(index), codes


def make_labels(pair_ids: Sequence[Hashable], annotator_ids: Sequence[Hashable], choices: Sequence[int]) -> Labels:
    """Labels from three parallel sequences; ValueError for unequal lengths, no labels, a choice that
    is not 0 or 1, or an annotator labelling the same pair twice."""
    if not len(pair_ids) == len(annotator_ids) == len(choices):
        raise ValueError(f"got {len(pair_ids)} pair ids, {len(annotator_ids)} annotator ids, {len(choices)} choices")
    if len(choices) == 0:
        raise ValueError("no labels")
    for i, value in enumerate(choices):
        if isinstance(value, float | str) or value not in (0, 1):
            raise ValueError(f"label {i}: choice must be 0 (A preferred) or 1 (B preferred), got {value!r}")
    pairs, pair = _codes(pair_ids)
    annotators, annotator = _codes(annotator_ids)
    seen = np.unique(pair * len(annotators) + annotator, return_index=True)[1]
    if len(seen) != len(pair):
        first_repeat = min(set(range(len(pair))) - set(seen.tolist()))
        raise ValueError(
            f"label {first_repeat}: annotator {annotator_ids[first_repeat]!r} labelled pair "
            f"{pair_ids[first_repeat]!r} twice"
        )
    return Labels(pairs, annotators, pair, annotator, np.asarray(choices, dtype=np.int64))


def _votes(labels: Labels) -> np.ndarray:
    """Per pair, how many labels preferred A and how many B. -> (pairs, 2) int"""
    votes = np.zeros((len(labels.pairs), 2), dtype=np.int64)
    np.add.at(votes, (labels.pair, labels.choice), 1)
    return votes


@dataclass(frozen=True)
class Statistic:
    """A statistic over the pairs with at least two labels; ``value`` is None when fewer than
    ``min_pairs`` such pairs exist, and ``n_pairs`` then counts those found."""

    value: float | None
    n_pairs: int
    min_pairs: int


@dataclass(frozen=True)
class RawAgreement(Statistic):
    n_couples: int  # annotator couples that labelled the same pair, summed over pairs


@dataclass(frozen=True)
class FleissKappa(Statistic):
    raters_per_pair: int  # m: only the pairs with exactly m labels enter (0 when there are none)


def raw_agreement(labels: Labels, min_pairs: int = 1) -> RawAgreement:
    """Pairwise percent agreement: the share of agreeing annotator couples, pooled over pairs.

    A pair with m labels, k of them for B, holds C(m, 2) couples of which C(k, 2) + C(m − k, 2)
    agree; the result is Σ agreeing / Σ couples over the pairs with m ≥ 2 (so a pair labelled by
    many annotators weighs more, by its number of couples).
    """
    votes = _votes(labels)  # (pairs, 2)
    m = votes.sum(axis=1)  # (pairs,)
    couples = m * (m - 1) // 2
    agreeing = (votes * (votes - 1) // 2).sum(axis=1)
    n_pairs, n_couples = int((m >= 2).sum()), int(couples.sum())
    value = agreeing.sum() / n_couples if n_pairs >= max(min_pairs, 1) else None
    return RawAgreement(None if value is None else float(value), n_pairs, min_pairs, n_couples)


def _choices_by_annotator(labels: Labels) -> list[dict[int, int]]:
    """For each annotator, pair code -> choice."""
    by_annotator: list[dict[int, int]] = [{} for _ in labels.annotators]
    for p, a, c in zip(labels.pair.tolist(), labels.annotator.tolist(), labels.choice.tolist(), strict=True):
        by_annotator[a][p] = c
    return by_annotator


def _kappa_of(first: list[int], second: list[int]) -> float:
    """Cohen's κ = (p_o − p_e) / (1 − p_e); nan when both annotators always chose the same one side."""
    if len(set(first) | set(second)) < 2:
        return float("nan")
    return float(cohen_kappa_score(first, second, labels=[0, 1]))


def cohen_kappa_by_pair(
    labels: Labels, min_shared: int = 5
) -> dict[tuple[Hashable, Hashable], tuple[float | None, int]]:
    """Cohen's κ (Cohen 1960) of every couple of annotators over the pairs both labelled.

    κ = (p_o − p_e) / (1 − p_e), p_o the share of shared pairs on which the two agree,
    p_e = Σ_c p_a(c) · p_b(c) from each annotator's own rate of choosing side c on those pairs.
    Returns {(a, b): (κ, n_shared)} for every couple that shares at least one pair, a before b in
    first-seen order; κ is None when n_shared < ``min_shared``.
    """
    by_annotator = _choices_by_annotator(labels)
    kappas = {}
    for a, b in combinations(range(len(labels.annotators)), 2):
        shared = sorted(by_annotator[a].keys() & by_annotator[b].keys())
        if not shared:
            continue
        kappa = None
        if len(shared) >= min_shared:
            kappa = _kappa_of([by_annotator[a][p] for p in shared], [by_annotator[b][p] for p in shared])
        kappas[(labels.annotators[a], labels.annotators[b])] = (kappa, len(shared))
    return kappas


def fleiss_kappa(labels: Labels, min_pairs: int = 5) -> FleissKappa:
    """Fleiss' κ (Fleiss 1971) over the pairs labelled by exactly m annotators, m the most common
    number of labels among pairs with at least two (ties go to the larger m).

    Fleiss' κ assumes every subject has the same number of raters. Keeping only the pairs with the
    most common count uses the bulk of the data without dropping labels in some arbitrary order;
    Krippendorff's α (below) uses every pair whatever its count.
    With n_ic the labels for side c on pair i: P_i = (Σ_c n_ic (n_ic − 1)) / (m (m − 1)),
    p_c = Σ_i n_ic / (N m), κ = (mean_i P_i − Σ_c p_c²) / (1 − Σ_c p_c²).
    """
    votes = _votes(labels)  # (pairs, 2)
    m = votes.sum(axis=1)  # (pairs,)
    counts = np.bincount(m[m >= 2])  # counts[k]: pairs with exactly k labels
    if counts.sum() == 0:
        return FleissKappa(None, 0, min_pairs, 0)
    raters = int(len(counts) - 1 - np.argmax(counts[::-1]))  # most common, the larger on ties
    table = votes[m == raters]  # (N, 2)
    if len(table) < min_pairs:
        return FleissKappa(None, len(table), min_pairs, raters)
    if (table.sum(axis=0) == 0).any():  # one side never chosen: chance agreement 1, κ is 0/0
        return FleissKappa(float("nan"), len(table), min_pairs, raters)
    return FleissKappa(float(inter_rater.fleiss_kappa(table, method="fleiss")), len(table), min_pairs, raters)


def krippendorff_alpha(labels: Labels, min_pairs: int = 5) -> Statistic:
    """Krippendorff's nominal α (Krippendorff 2011) over the pairs with at least two labels.

    α = 1 − D_o / D_e; for two values with coincidence matrix o (o_01 the off-diagonal count),
    n_c = Σ_k o_ck and n = n_0 + n_1 pairable values: α = 1 − (n − 1) o_01 / (n_0 n_1).
    Computed by ``krippendorff.alpha`` from the per-pair vote counts (its ``value_counts`` input,
    equivalent to a raters × pairs reliability matrix without holding that matrix in memory).
    """
    votes = _votes(labels)  # (pairs, 2)
    pairable = votes[votes.sum(axis=1) >= 2]  # (N, 2)
    if len(pairable) < min_pairs:
        return Statistic(None, len(pairable), min_pairs)
    if (pairable.sum(axis=0) == 0).any():  # one value only: D_e = 0, α is 0/0
        return Statistic(float("nan"), len(pairable), min_pairs)
    alpha = krippendorff.alpha(value_counts=pairable, value_domain=[0, 1], level_of_measurement="nominal")
    return Statistic(float(alpha), len(pairable), min_pairs)


@dataclass(frozen=True)
class AnnotatorAccuracy:
    """An annotator's accuracy over ``n`` labels, with its Wilson 95% interval [low, high]
    (all None when n = 0)."""

    annotator: Hashable
    accuracy: float | None
    n: int
    low: float | None
    high: float | None


def _with_interval(annotator: Hashable, hits: float, n: int) -> AnnotatorAccuracy:
    """Accuracy hits / n with the Wilson score interval (Wilson 1927) at 95%."""
    if n == 0:
        return AnnotatorAccuracy(annotator, None, 0, None, None)
    low, high = proportion_confint(hits, n, alpha=0.05, method="wilson")
    return AnnotatorAccuracy(annotator, float(hits / n), n, float(low), float(high))


def accuracy_on_gold(labels: Labels, gold: Mapping[Hashable, int]) -> list[AnnotatorAccuracy]:
    """Per annotator, the share of its labels on gold pairs that match the known better answer
    (0: A, 1: B). Labels on pairs without gold are left out; gold for pairs never labelled is unused.
    Every annotator is listed, in first-seen order, with accuracy None when it labelled no gold pair."""
    for pair_id, value in gold.items():
        if isinstance(value, float | str) or value not in (0, 1):
            raise ValueError(f"gold of pair {pair_id!r} must be 0 (A better) or 1 (B better), got {value!r}")
    truth = np.array([gold.get(p, -1) for p in labels.pairs], dtype=np.int64)[labels.pair]  # (n,), −1: no gold
    has_gold = truth >= 0
    n_labels = np.bincount(labels.annotator[has_gold], minlength=len(labels.annotators))
    hits = np.bincount(labels.annotator[has_gold & (truth == labels.choice)], minlength=len(labels.annotators))
    return [_with_interval(name, int(hits[a]), int(n_labels[a])) for a, name in enumerate(labels.annotators)]


def flag_unreliable(accuracies: Sequence[AnnotatorAccuracy], margin: float = 0.1) -> list[Hashable]:
    """Annotators far below the pool: the upper end of their 95% interval lies below the pool's
    median accuracy minus ``margin``. So an annotator is flagged only when even its most favourable
    plausible accuracy trails the typical annotator by more than the margin; with few labels the
    interval is wide and nobody is flagged on thin evidence. Annotators without accuracy are skipped."""
    known = [acc for acc in accuracies if acc.accuracy is not None]
    if not known:
        return []
    median = float(np.median([acc.accuracy for acc in known]))
    return [acc.annotator for acc in known if acc.high < median - margin]


@dataclass(frozen=True)
class DawidSkene:
    """Dawid–Skene estimates: P(B truly better) per pair (in ``Labels.pairs`` order), each
    annotator's 2×2 confusion matrix [true side, chosen side] and accuracy, and the prior P(B)."""

    posterior_b: np.ndarray  # (pairs,)
    confusion: dict[Hashable, np.ndarray]  # annotator -> (2, 2), rows sum to 1
    accuracy: list[AnnotatorAccuracy]
    prior_b: float
    iterations: int
    converged: bool


def _m_step(labels: Labels, posterior: np.ndarray, smoothing: float) -> tuple[np.ndarray, np.ndarray]:
    """Class prior π_k = (s + Σ_i T_ik) / (2s + N) and confusion θ_j[k, l] = (s + Σ_{i: j chose l} T_ik)
    / (2s + Σ_{i labelled by j} T_ik), with s pseudo-counts. (pairs, 2) -> (2,), (annotators, 2, 2)"""
    prior = (smoothing + posterior.sum(axis=0)) / (2 * smoothing + len(posterior))
    counts = np.full((len(labels.annotators), 2, 2), smoothing)  # [annotator, true k, chosen l]
    for chosen in (0, 1):
        rows = labels.choice == chosen
        np.add.at(counts[:, :, chosen], labels.annotator[rows], posterior[labels.pair[rows]])
    return prior, counts / counts.sum(axis=2, keepdims=True)


def _e_step(labels: Labels, prior: np.ndarray, confusion: np.ndarray) -> np.ndarray:
    """T_ik ∝ π_k · Π_{j labelled i} θ_j[k, l_ij], normalised over k in log space. -> (pairs, 2)"""
    log_joint = np.tile(np.log(prior), (len(labels.pairs), 1))  # (pairs, 2)
    np.add.at(log_joint, labels.pair, np.log(confusion[labels.annotator, :, labels.choice]))  # (n, 2) summed
    return np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))


def dawid_skene(labels: Labels, iterations: int = 1000, tol: float = 1e-6, smoothing: float = 0.01) -> DawidSkene:
    """Dawid and Skene 1979 for two classes: EM over the true side of each pair and each annotator's
    confusion matrix.

    Model: pair i's better side k has prior π_k; annotator j chooses side l with probability
    θ_j[k, l], independently given k. Start from the vote shares (soft majority vote:
    T_i1 = labels for B / labels on i), then alternate the M step (π and θ from T, with ``smoothing``
    pseudo-counts so that a perfect annotator does not give log 0) and the E step (T from π and θ)
    until no posterior moves by more than ``tol``, or ``iterations`` rounds. Deterministic. With the
    pseudo-counts each round raises the likelihood times a Dirichlet(1 + s) prior on π and θ (EM for
    the posterior mode rather than the plain maximum likelihood; the same as s → 0).
    Accuracy of annotator j: Σ_k π_k θ_j[k, k]; its interval is Wilson's on that accuracy over
    the annotator's number of labels (approximate: it ignores the uncertainty of the estimated truth).
    """
    votes = _votes(labels)  # (pairs, 2)
    posterior = votes / votes.sum(axis=1, keepdims=True)  # (pairs, 2)
    converged, rounds = False, 0
    while rounds < iterations and not converged:
        prior, confusion = _m_step(labels, posterior, smoothing)
        updated = _e_step(labels, prior, confusion)
        converged = bool(np.abs(updated - posterior).max() < tol)
        posterior, rounds = updated, rounds + 1
    prior, confusion = _m_step(labels, posterior, smoothing)
    accuracy = (confusion[:, [0, 1], [0, 1]] * prior).sum(axis=1)  # (annotators,)
    n_labels = np.bincount(labels.annotator, minlength=len(labels.annotators))
    return DawidSkene(
        posterior_b=posterior[:, 1],
        confusion={name: confusion[a] for a, name in enumerate(labels.annotators)},
        accuracy=[
            _with_interval(name, accuracy[a] * n_labels[a], int(n_labels[a]))
            for a, name in enumerate(labels.annotators)
        ],
        prior_b=float(prior[1]),
        iterations=rounds,
        converged=converged,
    )
