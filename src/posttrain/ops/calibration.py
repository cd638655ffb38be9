"""Calibration of stated answers: does a model that says it is 80% sure turn out right 80% of the time?

Inputs are numpy arrays of the same length n: ``confidences`` in [0, 1] (the probability the
model gave its answer) and ``correct`` (1 when the answer was right, else 0).

Sources: Naeini, Cooper and Hauskrecht 2015, "Obtaining Well Calibrated Probabilities Using
Bayesian Binning" (expected calibration error); Guo, Pleiss, Sun and Weinberger 2017, "On
Calibration of Modern Neural Networks" (15 equal-width bins, reliability diagrams); Nixon,
Dusenberry, Zhang, Jerfel and Tran 2019, "Measuring Calibration in Deep Learning" (adaptive,
equal-mass bins); Brier 1950, "Verification of Forecasts Expressed in Terms of Probability".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

N_BINS = 15  # as in Guo et al. 2017


@dataclass(frozen=True)
class CalibrationBin:
    """One bin of a reliability diagram: its confidence range (lower, upper], how many answers fell
    in it, their mean confidence and the share of them that were right (None for an empty bin)."""

    lower: float
    upper: float
    count: int
    mean_confidence: float | None
    accuracy: float | None


def _checked(confidences: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 vectors of one length n ≥ 1, confidences in [0, 1] and correctness 0 or 1."""
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)  # (n,)
    hits = np.asarray(correct, dtype=np.float64).reshape(-1)  # (n,)
    if len(conf) != len(hits):
        raise ValueError(f"got {len(conf)} confidences for {len(hits)} correctness values")
    if len(conf) == 0:
        raise ValueError("calibration needs at least one answer")
    if not np.all((conf >= 0) & (conf <= 1)):
        raise ValueError("confidences must lie in [0, 1]")
    if not np.all((hits == 0) | (hits == 1)):
        raise ValueError("correctness must be 0 or 1")
    return conf, hits


def bin_index(confidences: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Equal-width bin of each confidence: bin m (0-based) holds (m/M, (m+1)/M], bin 0 also holds 0.

    As Guo et al. 2017: I_m = ((m−1)/M, m/M] for m = 1..M. (n,) -> (n,) int
    """
    inner_edges = np.arange(1, n_bins) / n_bins  # (M−1,): 1/M .. (M−1)/M, each correctly rounded
    return np.digitize(confidences, inner_edges, right=True)


def reliability_bins(confidences: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> list[CalibrationBin]:
    """The M equal-width bins of a reliability diagram (Guo et al. 2017, section 2), empty ones included."""
    conf, hits = _checked(confidences, correct)
    index = bin_index(conf, n_bins)
    bins = []
    for m in range(n_bins):
        inside = index == m
        count = int(inside.sum())
        mean_conf = float(conf[inside].mean()) if count else None
        accuracy = float(hits[inside].mean()) if count else None
        bins.append(CalibrationBin(m / n_bins, (m + 1) / n_bins, count, mean_conf, accuracy))
    return bins


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE = Σ_m |B_m|/n · |acc(B_m) − conf(B_m)| over M equal-width bins (Naeini et al. 2015;
    Guo et al. 2017, eq. 3). 0 for a perfectly calibrated model, at most 1."""
    n = len(_checked(confidences, correct)[0])
    bins = reliability_bins(confidences, correct, n_bins)
    return float(sum(b.count / n * abs(b.accuracy - b.mean_confidence) for b in bins if b.count))


def adaptive_calibration_error(confidences: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE over equal-mass bins: the answers sorted by confidence and cut into M groups whose sizes
    differ by at most one (fewer groups when n < M), each weighted by its share of the answers.

    Equal-width bins leave most bins empty when confidences crowd near 1, so a few bins decide
    the ECE; equal-mass bins spend the resolution where the answers are (Nixon et al. 2019,
    "adaptive calibration error", here for the top label only).
    """
    conf, hits = _checked(confidences, correct)
    order = np.argsort(conf, kind="stable")  # (n,): ties keep their input order, so the result is deterministic
    groups = [g for g in np.array_split(order, n_bins) if len(g)]
    return float(sum(len(g) / len(conf) * abs(hits[g].mean() - conf[g].mean()) for g in groups))


def brier_score(confidences: np.ndarray, correct: np.ndarray) -> float:
    """Brier 1950: mean over answers of (confidence − correct)²; 0 is perfect, 0.25 is a constant 0.5.

    The binary (top-label) form: one probability per answer, the one the model gave its answer.
    """
    conf, hits = _checked(confidences, correct)
    return float(np.mean((conf - hits) ** 2))


def calibration_summary(confidences: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> dict:
    """``n``, ``ece``, ``ece_adaptive``, ``brier`` and the reliability ``bins`` (as dicts); the figures are
    None when there is no answer to score."""
    n = len(np.asarray(confidences).reshape(-1))
    if n == 0:
        return {"n": 0, "ece": None, "ece_adaptive": None, "brier": None, "bins": []}
    return {
        "n": n,
        "ece": expected_calibration_error(confidences, correct, n_bins),
        "ece_adaptive": adaptive_calibration_error(confidences, correct, n_bins),
        "brier": brier_score(confidences, correct),
        "bins": [asdict(b) for b in reliability_bins(confidences, correct, n_bins)],
    }
