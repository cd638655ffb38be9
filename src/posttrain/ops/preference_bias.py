"""Bias probes and hygiene checks of pairwise preference data (TRL's ``prompt``/``chosen``/``rejected`` rows).

Features of one answer, in natural units so that an effect reads in plain words:

    length        words (whitespace-separated), counted per 10 words
    confident     1 when the answer has an authoritative marker (``gold.CONFIDENT``: "definitely",
                  "certainly", "without a doubt", "of course", "clearly", ...), else 0
    hedging       1 when it hedges or abstains (``gold.HEDGES`` and ``gold.ABSTENTIONS``: "I think",
                  "maybe", "probably", "not sure", "I don't know", "unable to", ...), else 0
    list_format   1 when a line is a bullet ("-", "*", "+", "•") or numbered ("1." / "1)") item, else 0
    markdown      1 when it has a "#" heading, **bold** / __bold__ text, or a ``` / ~~~ code fence, else 0

Phrases are matched as whole words of the text read as ``gold.normalise`` reads it (lower case,
punctuation and apostrophes dropped, so "I don't know" matches "dont know").

Bias probe (a Bradley-Terry model on feature differences: Bradley and Terry 1952, "Rank Analysis
of Incomplete Block Designs"; used for length by Dubois, Galambosi, Liang and Hashimoto 2024,
"Length-Controlled AlpacaEval"). Each pair is shown in a random, seeded orientation (first, second)
with y = 1 when the first was preferred, and

    P(y = 1) = sigmoid(β · Δf),    Δf = f(first) − f(second)

fitted by maximum likelihood without an intercept: swapping the two answers flips the sign of Δf
and of the outcome, so a symmetric judge has no intercept. β is the change in log-odds of being
preferred per unit of f (per 10 words, or for having the marker); exp(β) is the odds ratio.
The joint model puts every feature in at once, so that length and confident wording are not
confused. Position bias (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot
Arena") is the share of choices for the left side with Wilson's 95% interval (Wilson 1927,
"Probable Inference, the Law of Succession, and Statistical Inference"), and the same as the
intercept of a logit of "left chosen" on a constant: intercept = log(share / (1 − share)).
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from dataclasses import dataclass

import numpy as np
import statsmodels.api as sm
from statsmodels.stats.proportion import proportion_confint
from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationWarning

from posttrain.errors import UserError
from posttrain.lab.gold import ABSTENTIONS, CONFIDENT, HEDGES, normalise

FEATURES = ("length", "confident", "hedging", "list_format", "markdown")
UNITS = {
    "length": "per 10 words",
    "confident": "marker present",
    "hedging": "hedge present",
    "list_format": "list present",
    "markdown": "markdown present",
    "position": "left side",  # the intercept of the position logit
    "truth": "truly better",  # the known answer's column in ``truth_probe``
}
MIN_LABELS = 20  # fewer labels than this: an annotator's effects are not estimated (None)
TRUNCATION_MIN_WORDS = 20  # shorter answers that stop without punctuation are taken as terse, not truncated
FIRST_ROWS = 10  # row numbers reported per hygiene issue
Z95 = 1.959963984540054  # standard normal quantile 0.975

_LIST_LINE = re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+\S", re.MULTILINE)
_MARKDOWN = re.compile(r"^\s{0,3}#{1,6}\s|\*\*[^*\n]+\*\*|__[^_\n]+__|^\s*(?:```|~~~)", re.MULTILINE)
_HEDGING = HEDGES + ABSTENTIONS


@dataclass(frozen=True)
class Pair:
    """One validated row: its 1-based number, the prompt as a comparable key and as text, both answers'
    texts, the annotator (or None), the side the chosen answer was shown on (0 left, 1 right, or None),
    the pair's id (or None) and the known answer ("chosen" or "rejected": which one is truly better; None
    when unknown)."""

    row: int
    prompt_key: str
    prompt: str
    chosen: str
    rejected: str
    annotator: str | None
    position: int | None
    pair_id: str | None = None
    gold: str | None = None


@dataclass(frozen=True)
class Effect:
    """A fitted effect: log-odds of being preferred per unit of the feature, its 95% Wald interval,
    the odds ratio exp(log_odds) with its interval, and the number of pairs it was fitted on."""

    feature: str
    unit: str
    log_odds: float
    low: float
    high: float
    odds_ratio: float
    odds_ratio_low: float
    odds_ratio_high: float
    n: int


@dataclass(frozen=True)
class PositionBias:
    """Choices for the left side: count, share with Wilson's 95% interval, and the logit intercept with
    its 95% Wald interval (None when every choice went to one side: the intercept is then infinite)."""

    n: int
    left_chosen: int
    share: float
    low: float
    high: float
    intercept: float | None
    intercept_low: float | None
    intercept_high: float | None


@dataclass(frozen=True)
class AnnotatorProbe:
    """One annotator's labels: how many, their one-feature effects, the joint model's effects and their
    position bias; all None when there are fewer than ``MIN_LABELS`` labels."""

    annotator: str
    n: int
    effects: dict[str, Effect | None] | None
    position: PositionBias | None
    joint: dict[str, Effect | None] | None = None


@dataclass(frozen=True)
class Issue:
    """A hygiene issue: how many rows have it and the 1-based numbers of the first ``FIRST_ROWS`` of them."""

    count: int
    rows: tuple[int, ...]


# --- reading rows -------------------------------------------------------------------------------


def _messages_text(value: list, row: int, field: str, assistant_only: bool) -> str:
    """The contents of a chat message list, joined by newlines (only the assistant's for an answer)."""
    texts = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UserError(f"row {row}, field {field!r}: every message needs a string 'content'")
        if not assistant_only or message.get("role") == "assistant":
            texts.append(message["content"])
    if assistant_only and not texts:
        raise UserError(f"row {row}, field {field!r}: no message with role 'assistant'")
    return "\n".join(texts)


def _text(row_data: dict, row: int, field: str, assistant_only: bool) -> str:
    if field not in row_data:
        raise UserError(f"row {row}: missing field {field!r}")
    value = row_data[field]
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages_text(value, row, field, assistant_only)
    raise UserError(f"row {row}, field {field!r}: expected a string or a list of chat messages")


def _position(value: object, row: int) -> int | None:
    """0 for left, 1 for right: "left"/"right" (any case) or the integers 0/1; None when absent."""
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in ("left", "right"):
        return 0 if value.lower() == "left" else 1
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return value
    raise UserError(f"row {row}, field 'position': expected 'left', 'right', 0 or 1, got {value!r}")


def _identifier(data: dict, row: int, field: str) -> str | None:
    """An optional id (``annotator_id``, ``pair_id``): a string or an integer, read as a string; None when absent."""
    value = data.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise UserError(f"row {row}, field {field!r}: expected a string or an integer, got {value!r}")
    return str(value)


def _gold(value: object, row: int) -> str | None:
    """The known answer: "chosen" or "rejected" (which one is truly better), None when absent."""
    if value is None or value in ("chosen", "rejected"):
        return value
    raise UserError(f"row {row}, field 'gold': expected 'chosen', 'rejected' or null, got {value!r}")


def parse_rows(rows: list[dict]) -> list[Pair]:
    """Validate preference rows (row numbers are 1-based positions in ``rows``) into ``Pair`` s."""
    pairs = []
    for row, data in enumerate(rows, start=1):
        if not isinstance(data, dict):
            raise UserError(f"row {row}: expected an object with 'prompt', 'chosen' and 'rejected'")
        prompt = _text(data, row, "prompt", assistant_only=False)
        annotator = _identifier(data, row, "annotator_id")
        pairs.append(
            Pair(
                row=row,
                prompt_key=json.dumps(data["prompt"], sort_keys=True),
                prompt=prompt,
                chosen=_text(data, row, "chosen", assistant_only=True),
                rejected=_text(data, row, "rejected", assistant_only=True),
                annotator=annotator,
                position=_position(data.get("position"), row),
                pair_id=_identifier(data, row, "pair_id"),
                gold=_gold(data.get("gold"), row),
            )
        )
    return pairs


# --- features -----------------------------------------------------------------------------------


def _has_phrase(text: str, phrases: tuple[str, ...]) -> bool:
    padded = f" {normalise(text)} "
    return any(f" {phrase} " in padded for phrase in phrases)


def answer_features(text: str) -> np.ndarray:
    """The features of one answer in ``FEATURES`` order and natural units (module docstring). -> (k,)"""
    return np.array(_features(text))


@functools.lru_cache(maxsize=65536)
def _features(text: str) -> tuple[float, ...]:
    """``answer_features`` as a tuple, remembered: an audit reads each answer once per model it fits."""
    return (
        len(text.split()) / 10,
        float(_has_phrase(text, CONFIDENT)),
        float(_has_phrase(text, _HEDGING)),
        float(_LIST_LINE.search(text) is not None),
        float(_MARKDOWN.search(text) is not None),
    )


def oriented_differences(pairs: list[Pair], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pair in a seeded random orientation: Δf = f(first) − f(second) (n, k) and y (n,), y = 1
    when the first answer was the chosen one."""
    chosen = np.array([answer_features(p.chosen) for p in pairs]).reshape(len(pairs), len(FEATURES))  # (n, k)
    rejected = np.array([answer_features(p.rejected) for p in pairs]).reshape(len(pairs), len(FEATURES))  # (n, k)
    chosen_first = np.random.default_rng(seed).integers(0, 2, size=len(pairs))  # (n,)
    sign = (2 * chosen_first - 1)[:, None]  # (n, 1): +1 chosen first, −1 rejected first
    return sign * (chosen - rejected), chosen_first.astype(np.float64)


# --- regressions --------------------------------------------------------------------------------


def independent_columns(x: np.ndarray) -> list[int]:
    """Indices of the columns of x (n, k) kept greedily, left to right, while each adds to the rank:
    a feature that never differs, or that another feature already determines, cannot be estimated."""
    kept: list[int] = []
    for j in range(x.shape[1]):
        if np.linalg.matrix_rank(x[:, [*kept, j]]) == len(kept) + 1:
            kept.append(j)
    return kept


def fit_logit(x: np.ndarray, y: np.ndarray, names: list[str]) -> dict[str, Effect | None]:
    """Logistic regression of y (n,) on the columns of x (n, k), as given (no intercept added), by
    maximum likelihood; 95% Wald intervals β ± 1.96·se. Columns that cannot be estimated get None, and
    so do all of them when the fit does not converge (under separation, when a feature predicts every
    choice, the maximum likelihood estimate is infinite)."""
    effects: dict[str, Effect | None] = dict.fromkeys(names)
    kept = independent_columns(x)
    if not kept:
        return effects
    with warnings.catch_warnings():  # separation is handled below, by its outcome: no estimate
        warnings.simplefilter("ignore", (ConvergenceWarning, PerfectSeparationWarning))
        result = sm.Logit(y, x[:, kept]).fit(disp=0, method="newton", maxiter=100)
    if not result.mle_retvals["converged"]:
        return effects
    intervals = result.conf_int(alpha=0.05)  # (len(kept), 2)
    for i, j in enumerate(kept):
        beta, low, high = float(result.params[i]), float(intervals[i, 0]), float(intervals[i, 1])
        odds = np.exp([beta, low, high]).tolist()
        effects[names[j]] = Effect(names[j], UNITS[names[j]], beta, low, high, *odds, len(y))
    return effects


def bias_probes(pairs: list[Pair], seed: int = 0) -> dict[str, Effect | None]:
    """One logit per feature, y on that feature's Δf alone (no intercept): the raw association."""
    deltas, y = oriented_differences(pairs, seed)
    effects: dict[str, Effect | None] = {}
    for j, name in enumerate(FEATURES):
        effects |= fit_logit(deltas[:, [j]], y, [name])
    return effects


def joint_probe(pairs: list[Pair], seed: int = 0) -> dict[str, Effect | None]:
    """One logit of y on every feature's Δf at once (no intercept): each effect holding the others fixed."""
    deltas, y = oriented_differences(pairs, seed)
    return fit_logit(deltas, y, list(FEATURES))


def truth_probe(pairs: list[Pair], seed: int = 0) -> dict[str, Effect | None] | None:
    """The joint model plus the known answer, on the pairs whose ``gold`` is known (None when none is):

        P(y = 1) = sigmoid(β · Δf + γ · t),   t = +1 when the first answer is the truly better one, −1 when
                                               the second is

    Each β is then a feature's effect beyond being right. Without t, a pool that rightly prefers an
    honest "I don't know" to a fabrication shows a taste for hedging, because hedging goes with the
    truly better answer; with t, only what wins besides the truth remains. γ ("truth") measures how
    strongly the truth itself decides (exp(γ) = 1: not at all).
    """
    known = np.array([p.gold is not None for p in pairs])  # (n,)
    if not known.any():
        return None
    deltas, y = oriented_differences(pairs, seed)  # the orientation of the whole set, so it matches joint_probe
    chosen_is_better = np.array([1.0 if p.gold == "chosen" else -1.0 for p in pairs])  # (n,)
    truth = (2 * y - 1) * chosen_is_better  # (n,): +1 when the first answer is the truly better one
    x = np.column_stack([deltas, truth])[known]  # (n_known, k + 1)
    return fit_logit(x, y[known], [*FEATURES, "truth"])


def position_bias(pairs: list[Pair]) -> PositionBias | None:
    """The share of choices for the left side among pairs with a stored position (None when none has).

    Wilson interval: (p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n), z = 1.96.
    """
    left = np.array([p.position == 0 for p in pairs if p.position is not None], dtype=np.float64)  # (n,)
    if len(left) == 0:
        return None
    n, k = len(left), int(left.sum())
    low, high = proportion_confint(k, n, alpha=0.05, method="wilson")
    if k in (0, n):
        return PositionBias(n, k, k / n, float(low), float(high), None, None, None)
    intercept = fit_logit(np.ones((n, 1)), left, ["position"])["position"]
    assert intercept is not None  # a constant column is always estimable
    return PositionBias(n, k, k / n, float(low), float(high), intercept.log_odds, intercept.low, intercept.high)


def per_annotator(pairs: list[Pair], seed: int = 0, min_labels: int = MIN_LABELS) -> list[AnnotatorProbe]:
    """One-feature effects, the joint model and position bias for each annotator (pairs without one are left
    out); annotators with fewer than ``min_labels`` labels get None. Orientation is the overall one."""
    deltas, y = oriented_differences(pairs, seed)
    probes = []
    for annotator in sorted({p.annotator for p in pairs if p.annotator is not None}):
        mask = np.array([p.annotator == annotator for p in pairs])  # (n,)
        n = int(mask.sum())
        if n < min_labels:
            probes.append(AnnotatorProbe(annotator, n, None, None))
            continue
        effects: dict[str, Effect | None] = {}
        for j, name in enumerate(FEATURES):
            effects |= fit_logit(deltas[mask][:, [j]], y[mask], [name])
        mine = [p for p in pairs if p.annotator == annotator]
        joint = fit_logit(deltas[mask], y[mask], list(FEATURES))
        probes.append(AnnotatorProbe(annotator, n, effects, position_bias(mine), joint))
    return probes


# --- hygiene ------------------------------------------------------------------------------------


def looks_truncated(text: str) -> bool:
    """At least ``TRUNCATION_MIN_WORDS`` words, and the text stops mid-sentence: its last character is a
    letter, digit, comma, hyphen or opening bracket, and its last line is not a list item or heading
    (those legitimately end without punctuation)."""
    stripped = text.strip()
    if len(stripped.split()) < TRUNCATION_MIN_WORDS:
        return False
    last_line = stripped.splitlines()[-1]
    if _LIST_LINE.match(last_line) or last_line.lstrip().startswith("#"):
        return False
    return stripped[-1].isalnum() or stripped[-1] in ",-(["


def _issue(rows: list[int]) -> Issue:
    return Issue(len(rows), tuple(rows[:FIRST_ROWS]))


def hygiene(pairs: list[Pair]) -> dict[str, Issue]:
    """Rows with each data problem:

    duplicate       same annotator (or both without one), same prompt and same two answers as an
                    earlier row, in either order (so a contradiction is also a duplicate); the later
                    rows are reported. Two annotators labelling the same pair is overlap, not a duplicate.
    contradictory   same annotator, prompt and answers as an earlier row with chosen and rejected swapped
    identical       chosen equal to rejected (after stripping surrounding whitespace)
    empty           prompt, chosen or rejected empty or whitespace only
    truncated       chosen or rejected ``looks_truncated``
    """
    seen: set[tuple[str | None, str, str, str]] = set()
    found: dict[str, list[int]] = {name: [] for name in ("duplicate", "contradictory", "identical", "empty")}
    found["truncated"] = []
    for p in pairs:
        same, swapped = (
            (p.annotator, p.prompt_key, p.chosen, p.rejected),
            (p.annotator, p.prompt_key, p.rejected, p.chosen),
        )
        if same in seen or swapped in seen:
            found["duplicate"].append(p.row)
        if swapped in seen and p.chosen != p.rejected:
            found["contradictory"].append(p.row)
        seen.add(same)
        if p.chosen.strip() == p.rejected.strip():
            found["identical"].append(p.row)
        if not (p.prompt.strip() and p.chosen.strip() and p.rejected.strip()):
            found["empty"].append(p.row)
        if looks_truncated(p.chosen) or looks_truncated(p.rejected):
            found["truncated"].append(p.row)
    return {name: _issue(rows) for name, rows in found.items()}
