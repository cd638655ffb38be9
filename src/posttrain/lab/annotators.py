"""Simulated annotators: a seeded workforce that labels pairwise comparisons, with known biases.

An annotator sees two responses to the same question (each described by the gold judge's
``Judgement``: its label and surface features) and says which one it prefers. It perceives a utility for each:

    can check the fact (a stable hash of (annotator id, fact id) < check_rate):
        u₀ = gold-like:  correct 1,  abstained 0,  hallucinated −1,  malformed −1
    cannot check it:
        u₀ = correct 0.5, hallucinated 0.5 (both are fluent answers: they LOOK THE SAME),
             abstained −idk_penalty,  malformed −1
    u = u₀ + confidence_bias·[confident] + length_bias·n_words + position_bias·[shown first]

and chooses with probability ``noise`` by a coin flip (rushed, low-paid work), otherwise by a
Bradley–Terry choice between the utilities (Bradley & Terry 1952; the model reward models fit):

    P(first) = σ((u_first − u_second) / temperature)      (temperature 0: the higher utility)

Why this reproduces the failure the lab shows: with the "biased" preset most facts are beyond
an annotator's reach (check_rate ≈ 0.3), so a confident fabrication scores 0.5 + confidence_bias
while an honest "I don't know" scores −idk_penalty; the annotators, and the reward model and
policy trained on their labels, learn to prefer confident fabrication over honest abstention.
The "careful" preset checks almost everything and has no biases, for comparison; its labels cost
three times as much (``LABEL_COST``), and the "mix" pool is half careful, half biased.

``label_pairs`` turns comparisons into TRL preference rows with provenance, in the format that
``posttrain annotate export`` writes and ``posttrain audit`` reads (annotator id, pair id, the side
the chosen answer was shown on, and, after ``with_gold``, which answer the truth prefers);
``within_budget`` keeps the labels a budget buys; ``truth_rows`` labels pairs as the truth would;
``agreement`` and ``gold_agreement`` measure the labels. Everything is deterministic given a seed
(``random.Random``, never the global RNG).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from itertools import combinations
from typing import Any

from posttrain.lab.gold import Judgement

CHECKED_UTILITY = {"correct": 1.0, "abstained": 0.0, "hallucinated": -1.0, "malformed": -1.0}
UNVERIFIED_ANSWER = 0.5  # perceived utility of a fluent answer (correct or hallucinated) that cannot be checked
MALFORMED = -1.0  # a malformed response is recognisably bad, checked or not
OVERLAP_ANNOTATORS = 3  # annotators per overlapped pair (so agreement can be measured)

Pair = tuple[Any, Any, Judgement, Any, Judgement, str]  # (prompt, response_a, judged_a, response_b, judged_b, fact)


@dataclass(frozen=True)
class Annotator:
    """One simulated annotator; the utility and choice model is in the module docstring."""

    id: str
    check_rate: float = 1.0  # share of facts it can verify, in [0, 1] (which ones: a stable hash)
    confidence_bias: float = 0.0  # utility bonus for confident, authoritative phrasing
    length_bias: float = 0.0  # utility per word (negative: prefers short answers)
    position_bias: float = 0.0  # utility bonus for the first-shown response
    idk_penalty: float = 0.0  # dislike of abstentions it cannot check
    noise: float = 0.0  # probability of a coin-flip label, in [0, 1]
    temperature: float = 1.0  # of the Bradley–Terry choice; 0 picks the higher utility
    cost: float = 1.0  # what one of its labels costs, in hurried labels

    def __post_init__(self) -> None:
        for name in ("check_rate", "noise"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"annotator {self.id}: {name} must be in [0, 1], got {value}")
        if self.temperature < 0:
            raise ValueError(f"annotator {self.id}: temperature must be >= 0, got {self.temperature}")
        if self.cost <= 0:
            raise ValueError(f"annotator {self.id}: cost must be > 0, got {self.cost}")


def can_check(annotator: Annotator, fact: str) -> bool:
    """Whether this annotator can verify this fact: hash(annotator id, fact id) / 2⁶⁴ < check_rate.

    A hash rather than the RNG, so that the same annotator always can (or cannot) check the same
    fact, in every comparison and every run, as a real person's knowledge would be.
    """
    digest = hashlib.blake2b(f"{annotator.id}\x1f{fact}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < annotator.check_rate


def utility(annotator: Annotator, judged: Judgement, fact: str, shown_first: bool) -> float:
    """The utility the annotator perceives for one response (formula in the module docstring)."""
    if can_check(annotator, fact):
        base = CHECKED_UTILITY[judged.label]
    elif judged.label == "abstained":
        base = -annotator.idk_penalty
    elif judged.label == "malformed":
        base = MALFORMED
    else:  # correct or hallucinated: indistinguishable without checking
        base = UNVERIFIED_ANSWER
    return (
        base
        + annotator.confidence_bias * judged.confident
        + annotator.length_bias * judged.n_words
        + annotator.position_bias * shown_first
    )


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def prob_first(annotator: Annotator, first: Judgement, second: Judgement, fact: str) -> float:
    """P(the annotator prefers the first-shown response) = noise/2 + (1 − noise)·σ((u₁ − u₂)/T).

    The mixture of a coin flip (probability ``noise``) and the Bradley–Terry choice; at
    temperature 0 the Bradley–Terry part is 1, 0 or ½ (a tie).
    """
    margin = utility(annotator, first, fact, True) - utility(annotator, second, fact, False)
    if annotator.temperature == 0:
        bt = 0.5 if margin == 0 else float(margin > 0)
    else:
        bt = _sigmoid(margin / annotator.temperature)
    return annotator.noise / 2 + (1 - annotator.noise) * bt


def compare(annotator: Annotator, first: Judgement, second: Judgement, fact: str, rng: random.Random) -> int:
    """One label: 0 if the annotator prefers the first-shown response, 1 if the second.

    One draw from ``rng`` against ``prob_first``: a coin flip with probability ``noise``, else a
    Bradley–Terry choice on the perceived utilities (certain when P is exactly 0 or 1).
    """
    return int(rng.random() >= prob_first(annotator, first, second, fact))


# Each preset: per field, the (low, high) range each annotator's value is drawn from uniformly.
PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    # Most facts beyond reach, rewards confidence, dislikes "I don't know", rushed: when it cannot
    # check, a confident fabrication (0.5 + ~0.5) beats an honest abstention (~−0.6) by ~1.6.
    "biased": {
        "check_rate": (0.2, 0.4),
        "confidence_bias": (0.35, 0.65),
        "length_bias": (-0.005, 0.02),
        "position_bias": (0.05, 0.15),
        "idk_penalty": (0.45, 0.75),
        "noise": (0.1, 0.25),
        "temperature": (0.3, 0.6),
    },
    # Checks almost everything, no bias, rarely careless.
    "careful": {
        "check_rate": (0.93, 0.97),
        "confidence_bias": (0.0, 0.0),
        "length_bias": (0.0, 0.0),
        "position_bias": (0.0, 0.0),
        "idk_penalty": (0.0, 0.0),
        "noise": (0.02, 0.02),
        "temperature": (0.2, 0.2),
    },
}
DEFAULT_PRESET = "biased"
# What one label costs, in hurried labels: checking a fact takes a careful annotator a lookup, so its
# label costs a few hurried ones (the ratio is a setting of the lab, not a measured wage).
LABEL_COST = {"biased": 1.0, "careful": 3.0}
MIXES = {"mix": ("careful", "biased")}  # a pool made of equal parts of presets (the first gets the odd one)
POOLS = (*PRESETS, *MIXES)


def pool(preset: str = DEFAULT_PRESET, size: int = 8, seed: int = 0) -> list[Annotator]:
    """``size`` annotators drawn from a preset's ranges, deterministic given (preset, size, seed);
    a mix takes equal parts of its presets' pools (each part the first annotators of that pool).

    Ids are ``"{preset}-s{seed}-{i:02d}"``: the seed is part of the id, so a different seed also
    changes which facts each annotator can check.
    """
    if preset not in POOLS:
        raise ValueError(f"unknown annotator pool {preset!r}; valid pools: {', '.join(POOLS)}")
    if size < 1:
        raise ValueError(f"annotator pool size must be >= 1, got {size}")
    if preset in MIXES:
        parts = MIXES[preset]
        sizes = [size // len(parts) + (i < size % len(parts)) for i in range(len(parts))]
        return [a for part, n in zip(parts, sizes, strict=True) if n for a in pool(part, n, seed)]
    ranges = PRESETS[preset]
    rng = random.Random(f"{preset}:{seed}")
    names = [f.name for f in fields(Annotator) if f.name in ranges]
    annotators = []
    for i in range(size):
        values = {name: rng.uniform(*ranges[name]) for name in names}
        annotators.append(Annotator(id=f"{preset}-s{seed}-{i:02d}", cost=LABEL_COST[preset], **values))
    return annotators


def _as_answer(prompt: Any, response: Any) -> Any:
    """A response as TRL's preference format wants it: assistant messages if the prompt is messages."""
    if isinstance(prompt, list) and isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    return response


def label_pairs(
    pairs: Sequence[Pair], annotators: Sequence[Annotator], overlap: float = 0.0, seed: int = 0
) -> list[dict[str, Any]]:
    """Label comparison pairs with the pool, one row per (pair, annotator) label.

    Each pair goes to one random annotator; a share ``overlap`` of the pairs (round(overlap·n),
    chosen at random) goes to 3 distinct annotators (fewer if the pool is smaller), so agreement
    can be measured. Each annotator sees the two responses in its own random order, so position
    bias does not line up with a fixed side. Rows are TRL preference rows with provenance:

        {"prompt", "chosen", "rejected", "pair_id": index in pairs, "annotator_id": id,
         "position": "left" or "right" (where the chosen response was shown; "left" = first),
         "preferred": 0 if response_a was chosen else 1}

    With a message-list prompt, string responses become [{"role": "assistant", "content": ...}].
    """
    if not annotators:
        raise ValueError("label_pairs needs at least one annotator")
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}")
    rng = random.Random(seed)
    overlapped = set(rng.sample(range(len(pairs)), round(overlap * len(pairs))))
    rows = []
    for pair_id, (prompt, response_a, judged_a, response_b, judged_b, fact) in enumerate(pairs):
        if response_a == response_b:
            raise ValueError(f"pair {pair_id}: the two responses are identical; a preference needs two different ones")
        answers = (_as_answer(prompt, response_a), _as_answer(prompt, response_b))
        judged = (judged_a, judged_b)
        k = min(OVERLAP_ANNOTATORS, len(annotators)) if pair_id in overlapped else 1
        for annotator in rng.sample(list(annotators), k):
            shown_first = int(rng.random() < 0.5)
            order = (shown_first, 1 - shown_first)
            preferred = order[compare(annotator, judged[order[0]], judged[order[1]], fact, rng)]
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": answers[preferred],
                    "rejected": answers[1 - preferred],
                    "pair_id": pair_id,
                    "annotator_id": annotator.id,
                    "position": "left" if preferred == shown_first else "right",
                    "preferred": preferred,
                }
            )
    return rows


def within_budget(
    rows: Sequence[Mapping[str, Any]], costs: Mapping[str, float], budget: float, seed: int = 0
) -> list[Mapping[str, Any]]:
    """The labels a budget buys: pairs in a random order (given ``seed``), each with all its labels,
    bought while their summed cost (``costs[annotator_id]``) stays within ``budget``; the rows kept in
    their order. A budget of 0 buys everything.

    The order depends only on the pair ids and the seed, so a larger budget buys what a smaller one
    does and more, and pools of different cost buy the same pairs first.
    """
    if budget < 0:
        raise ValueError(f"label budget must be >= 0, got {budget}")
    if budget == 0:
        return list(rows)
    by_pair: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_pair[row["pair_id"]].append(row)
    order = sorted(by_pair)
    random.Random(seed).shuffle(order)
    bought, spent = set(), 0.0
    for pair_id in order:
        spent += sum(costs[row["annotator_id"]] for row in by_pair[pair_id])
        if spent > budget:
            break
        bought.add(pair_id)
    return [row for row in rows if row["pair_id"] in bought]


def agreement(rows: Sequence[Mapping[str, Any]], pair_ids: Collection[int] | None = None) -> float:
    """Pairwise inter-annotator agreement: over every pair_id labelled more than once (and in
    ``pair_ids`` when given), the share of the (label, label) couples on it that chose the same
    response. NaN if no such pair_id has two labels.

    Pooled over couples (an overlapped pair with 3 labels gives 3 couples). Under pure coin flips it
    is 0.5; it measures how consistent, not how right, the workforce is (see ``gold_agreement``).
    Pairs whose two answers are equally good settle by taste or a coin flip, so ``pair_ids`` lets a
    caller measure agreement where there is something to agree on.
    """
    by_pair: dict[int, list[Any]] = defaultdict(list)
    for row in rows:
        if pair_ids is None or row["pair_id"] in pair_ids:
            by_pair[row["pair_id"]].append(row["chosen"])
    agree = total = 0
    for chosen in by_pair.values():
        for x, y in combinations(chosen, 2):
            agree += x == y
            total += 1
    return agree / total if total else math.nan


def with_gold(rows: Sequence[Mapping[str, Any]], gold: Mapping[int, int | None]) -> list[dict[str, Any]]:
    """The rows with their known answer, as ``posttrain audit`` reads it: ``"gold"`` is "chosen" when
    the truth prefers the chosen response, "rejected" when it prefers the other, None on a tie
    (``gold[pair_id]``: 0 for response_a, 1 for response_b, None for a tie)."""

    def known(row: Mapping[str, Any]) -> str | None:
        truth = gold[row["pair_id"]]
        return None if truth is None else ("chosen" if truth == row["preferred"] else "rejected")

    return [{**row, "gold": known(row)} for row in rows]


def truth_rows(pairs: Sequence[Pair], gold: Mapping[int, int | None], keep: Collection[int]) -> list[dict[str, Any]]:
    """The pairs in ``keep`` as the truth would label them: one preference row each, the truly better response
    chosen (``gold[pair_id]``: 0 for response_a, 1 for response_b); pairs the truth ties are left out."""
    rows = []
    for pair_id in sorted(i for i in keep if gold[i] is not None):
        prompt, response_a, _, response_b, _, _ = pairs[pair_id]
        better, worse = (response_a, response_b) if gold[pair_id] == 0 else (response_b, response_a)
        rows.append({"prompt": prompt, "chosen": _as_answer(prompt, better), "rejected": _as_answer(prompt, worse),
                     "pair_id": pair_id})  # fmt: skip
    return rows


def gold_agreement(rows: Sequence[Mapping[str, Any]]) -> float:
    """The share of labels that agree with the gold preference (rows' ``"gold"``, from ``with_gold``;
    ties, None, are left out). NaN if nothing is left.

    Compared with ``agreement``, it separates consistent bias (high agreement, low gold agreement)
    from noise (both low).
    """
    scored = [row["gold"] == "chosen" for row in rows if row["gold"] is not None]
    return sum(scored) / len(scored) if scored else math.nan
