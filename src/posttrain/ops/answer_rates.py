"""What a model did with a set of questions: accuracy, abstention, hallucination and length, each
with a bootstrap 95% interval and the number of questions behind it.

One ``Outcome`` per question. A question is answerable (it has a right answer) or not (nothing
in the model's reach could answer it). The model either states an answer, which is correct or
not, or abstains ("I don't know"), or does neither (an empty or malformed response).

Rates (each the share of a set of questions):
  accuracy                    correct, over answerable questions
  abstention                  abstained, over unanswerable questions (the right thing to do there)
  abstention_answerable       abstained, over answerable questions (over-caution)
  hallucination               a stated answer that is wrong, or any stated answer to an
                              unanswerable question, over all questions
  hallucination_unanswerable  a stated answer, over unanswerable questions
  no_answer                   neither an answer nor an abstention, over all questions
and ``mean_length``, the mean response length in words over the questions that have one.

Intervals: the bias-corrected and accelerated (BCa) bootstrap of the mean (Efron 1987, "Better
Bootstrap Confidence Intervals"), through ``scipy.stats.bootstrap`` with a fixed seed, so the same
outcomes always give the same interval. When several questions ask about one fact (``clusters``),
the bootstrap resamples facts, not questions (``cluster_mean``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

CONFIDENCE_LEVEL = 0.95
N_RESAMPLES = 9999  # scipy's default: the interval's ends move by well under 0.01 between seeds
LABELS = ("correct", "wrong", "abstained", "no_answer")


@dataclass(frozen=True)
class Outcome:
    """One question, answered. ``correct`` implies ``stated`` and ``answerable``; a response is
    never both a stated answer and an abstention. ``confidence``: the probability the model gave its
    answer (None when not measured); ``length``: the response's words (None when it has none, as a
    multiple-choice pick)."""

    answerable: bool
    stated: bool
    correct: bool
    abstained: bool
    confidence: float | None = None
    length: float | None = None

    def __post_init__(self) -> None:
        if self.correct and not (self.stated and self.answerable):
            raise ValueError("a correct answer is a stated answer to an answerable question")
        if self.stated and self.abstained:
            raise ValueError("a response is a stated answer or an abstention, not both")

    @property
    def hallucinated(self) -> bool:
        return self.stated and not self.correct

    @property
    def label(self) -> str:
        """correct, wrong (a hallucination), abstained or no_answer."""
        if self.stated:
            return "correct" if self.correct else "wrong"
        return "abstained" if self.abstained else "no_answer"

    @classmethod
    def from_label(cls, label: str, answerable: bool, confidence: float | None = None, length: float | None = None):
        """The outcome a label in ``LABELS`` stands for."""
        if label not in LABELS:
            raise ValueError(f"unknown label {label!r}; expected one of {', '.join(LABELS)}")
        stated = label in ("correct", "wrong")
        return cls(answerable, stated, label == "correct", label == "abstained", confidence, length)


@dataclass(frozen=True)
class Rate:
    """A mean over ``n`` questions and its bootstrap interval; all None when ``n`` is 0."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def bootstrap_mean(values: np.ndarray, seed: int = 0) -> Rate:
    """Mean of ``values`` (n,) with its 95% BCa bootstrap interval.

    A sample whose values are all equal (one value included) has no spread to resample: its
    interval is the value itself, returned without calling the bootstrap, which would warn.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)  # (n,)
    n = len(values)
    if n == 0:
        return Rate(None, None, None, 0)
    value = float(values.sum() / n)  # the exact share k/n for 0/1 values
    if np.all(values == values[0]):
        return Rate(value, value, value, n)
    result = stats.bootstrap((values,), np.mean, n_resamples=N_RESAMPLES, confidence_level=CONFIDENCE_LEVEL,
                             method="BCa", vectorized=True, rng=np.random.default_rng(seed))  # fmt: skip
    interval = result.confidence_interval
    return Rate(value, float(interval.low), float(interval.high), n)


def cluster_mean(values: np.ndarray, clusters: Sequence[Hashable], seed: int = 0) -> Rate:
    """Mean of ``values`` (n,) when they come in correlated clusters (several phrasings of one fact), with
    the 95% BCa interval of the cluster bootstrap: whole clusters are resampled, and the statistic is
    Σ values / Σ counts over the resampled clusters (Davison & Hinkley 1997, "Bootstrap Methods and their
    Application", section 3.8). ``n`` counts the values. One value per cluster gives ``bootstrap_mean``'s
    figure, and an interval at least as wide when clusters hold values that agree."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)  # (n,)
    if len(values) != len(clusters):
        raise ValueError(f"{len(values)} values but {len(clusters)} cluster labels")
    n = len(values)
    if n == 0:
        return Rate(None, None, None, 0)
    index = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
    owner = np.array([index[c] for c in clusters])  # (n,)
    sums = np.bincount(owner, weights=values, minlength=len(index))  # (C,)
    counts = np.bincount(owner, minlength=len(index)).astype(np.float64)  # (C,)
    value = float(values.sum() / n)
    if np.all(values == values[0]) or len(index) == 1:
        return Rate(value, value, value, n)

    def ratio(total, count, axis=-1):
        return total.sum(axis=axis) / count.sum(axis=axis)

    rng = np.random.default_rng(seed)
    result = stats.bootstrap((sums, counts), ratio, paired=True, n_resamples=N_RESAMPLES, vectorized=True,
                             confidence_level=CONFIDENCE_LEVEL, method="BCa", rng=rng)  # fmt: skip
    interval = result.confidence_interval
    return Rate(value, float(interval.low), float(interval.high), n)


def share(outcomes: Sequence[Outcome], event: Callable[[Outcome], bool], among: Callable[[Outcome], bool], seed: int,
          clusters: Sequence[Hashable] | None = None) -> Rate:  # fmt: skip
    """The share of questions ``among`` whose outcome satisfies ``event``, as a ``Rate`` (by cluster when given)."""
    chosen = [i for i, o in enumerate(outcomes) if among(o)]
    flags = np.array([event(outcomes[i]) for i in chosen], dtype=np.float64)
    return bootstrap_mean(flags, seed) if clusters is None else cluster_mean(flags, [clusters[i] for i in chosen], seed)


def answer_rates(
    outcomes: Sequence[Outcome], seed: int = 0, clusters: Sequence[Hashable] | None = None
) -> dict[str, Rate]:
    """Every rate of the module docstring, plus ``mean_length``, for one model's outcomes. ``clusters``: one
    label per outcome (its fact) when several questions ask the same thing; the intervals then resample facts."""

    def every(_: Outcome) -> bool:
        return True

    def answerable(o: Outcome) -> bool:
        return o.answerable

    def unanswerable(o: Outcome) -> bool:
        return not o.answerable

    measured = [i for i, o in enumerate(outcomes) if o.length is not None]
    lengths = np.array([outcomes[i].length for i in measured], dtype=np.float64)
    if clusters is None:
        mean_length = bootstrap_mean(lengths, seed)
    else:
        mean_length = cluster_mean(lengths, [clusters[i] for i in measured], seed)
    return {
        "accuracy": share(outcomes, lambda o: o.correct, answerable, seed, clusters),
        "abstention": share(outcomes, lambda o: o.abstained, unanswerable, seed, clusters),
        "abstention_answerable": share(outcomes, lambda o: o.abstained, answerable, seed, clusters),
        "hallucination": share(outcomes, lambda o: o.hallucinated, every, seed, clusters),
        "hallucination_unanswerable": share(outcomes, lambda o: o.hallucinated, unanswerable, seed, clusters),
        "no_answer": share(outcomes, lambda o: o.label == "no_answer", every, seed, clusters),
        "mean_length": mean_length,
    }
