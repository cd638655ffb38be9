"""Labels as TRL preference rows with provenance: ``posttrain annotate export``.

A label chooses "a", "b", "tie" or "both_bad" between a pair's ``response_a`` and ``response_b``.
Three ways to turn labels into rows (``aggregate``):

- ``all``: one row per label, in labelling order. An "a"/"b" label gives chosen = the chosen
  response; ``position`` is the side ("left"/"right") it was shown on, ``annotator_id`` who chose.
  Tie and both_bad labels are rows only with ``keep_ties``, then with chosen = response_a,
  rejected = response_b and ``choice`` saying what the label was.
- ``majority``: one row per labelled pair; chosen = the side with more "a"/"b" votes. Equal a/b
  votes (or only tie/both_bad votes) make the pair a tie: dropped unless ``keep_ties``, then a
  row with ``"tie": true`` and chosen = response_a.
- ``reliability``: Dawid and Skene 1979, "Maximum Likelihood Estimation of Observer Error-Rates
  Using the EM Algorithm" (``posttrain.ops.agreement.dawid_skene``), over the "a"/"b" labels:
  EM estimates each annotator's confusion matrix and each pair's posterior P(b truly better),
  so a reliable annotator outweighs an unreliable one where a vote count would tie. chosen = the
  side with posterior above 0.5, ``p_chosen`` its posterior; 0.5 (up to rounding, 1e-9) or no
  a/b vote is a tie, handled as for majority.

Aggregated rows carry ``annotator_ids`` (everyone who labelled the pair, in labelling order),
``votes`` ({"a", "b", "tie", "both_bad"} counts) and ``agreement``, the share of the a/b votes
that went to chosen (None without a/b votes). ``gold`` is the pair's known answer relative to
chosen: "chosen", "rejected", or None when the pair has none. With a message-list prompt, chosen
and rejected become ``[{"role": "assistant", "content": text}]`` (TRL's conversational format).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from posttrain.annotate.pairs import PairRecord
from posttrain.annotate.store import Label, Store
from posttrain.ops.agreement import dawid_skene, make_labels

AGGREGATES = ("majority", "reliability", "all")
TIE_TOLERANCE = 1e-9  # EM's floating point lands a symmetric case within an ulp or so of 0.5, on either side


def export_rows(store: Store, aggregate: str, keep_ties: bool) -> list[dict]:
    """The rows of ``posttrain annotate export`` (see the module docstring)."""
    return build_rows(store.pairs(), store.labels(), aggregate, keep_ties)[0]


def build_rows(pairs: list[PairRecord], labels: list[Label], aggregate: str, keep_ties: bool) -> tuple[list[dict], int]:
    """(rows, ties dropped): labels of the pairs ``pairs`` aggregated by ``aggregate``."""
    if aggregate == "all":
        by_id = {pair.id: pair for pair in pairs}
        rows = [label_row(by_id[label.pair_id], label) for label in labels]
        kept = [row for row in rows if keep_ties or row["choice"] in ("a", "b")]
        return kept, len(rows) - len(kept)
    if aggregate == "majority":
        winner = majority_winner
    elif aggregate == "reliability":
        winner = reliability_winner(labels)
    else:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    by_pair: dict[str, list[Label]] = {}
    for label in labels:
        by_pair.setdefault(label.pair_id, []).append(label)
    rows = [pair_row(pair, by_pair[pair.id], winner) for pair in pairs if pair.id in by_pair]
    kept = [row for row in rows if keep_ties or not row["tie"]]
    return kept, len(rows) - len(kept)


def preference(pair: PairRecord, chosen: str) -> dict[str, Any]:
    """prompt / chosen / rejected with ``chosen`` ("a" or "b") the preferred response, and ``gold``
    relative to it; responses become assistant messages when the prompt is a message list."""
    other = "b" if chosen == "a" else "a"
    texts = {"a": pair.response_a, "b": pair.response_b}
    if isinstance(pair.prompt, list):
        texts = {side: [{"role": "assistant", "content": text}] for side, text in texts.items()}
    gold = None if pair.gold is None else ("chosen" if pair.gold == chosen else "rejected")
    return {"prompt": pair.prompt, "chosen": texts[chosen], "rejected": texts[other], "pair_id": pair.id, "gold": gold}


def label_row(pair: PairRecord, label: Label) -> dict[str, Any]:
    """One label as a row; a tie or both_bad counts response_a as chosen."""
    chosen = label.choice if label.choice in ("a", "b") else "a"
    return {
        **preference(pair, chosen),
        "annotator_id": label.annotator,
        "position": "left" if label.left == chosen else "right",
        "choice": label.choice,
        "strength": label.strength,
        "comment": label.comment,
        "seconds": label.seconds,
        "is_check": label.is_check,
    }


# A winner rule: a pair's labels -> (chosen side "a"/"b", or None for a tie; extra fields of the row)
Winner = Callable[[PairRecord, list[Label]], tuple[str | None, dict[str, Any]]]


def pair_row(pair: PairRecord, labels: list[Label], winner: Winner) -> dict[str, Any]:
    """One pair's labels as one row, chosen by ``winner``."""
    votes = Counter({"a": 0, "b": 0, "tie": 0, "both_bad": 0}) + Counter(label.choice for label in labels)
    side, extra = winner(pair, labels)
    chosen = side or "a"
    ab_votes = votes["a"] + votes["b"]
    return {
        **preference(pair, chosen),
        "tie": side is None,
        "annotator_ids": [label.annotator for label in labels],
        "votes": {choice: votes[choice] for choice in ("a", "b", "tie", "both_bad")},
        "agreement": votes[chosen] / ab_votes if ab_votes else None,
        **extra,
    }


def majority_winner(pair: PairRecord, labels: list[Label]) -> tuple[str | None, dict[str, Any]]:
    """The side with more a/b votes; None when they are equal."""
    a, b = (sum(label.choice == side for label in labels) for side in ("a", "b"))
    return ("a" if a > b else "b" if b > a else None), {}


def reliability_winner(labels: list[Label]) -> Winner:
    """A winner rule by the Dawid–Skene posterior P(b better) fitted on every a/b label; adds ``p_chosen``
    (None for a pair without a/b labels)."""
    decided = [label for label in labels if label.choice in ("a", "b")]
    posterior_b: dict[str, float] = {}
    if decided:
        coded = make_labels([label.pair_id for label in decided], [label.annotator for label in decided],
                            [int(label.choice == "b") for label in decided])  # fmt: skip
        posterior_b = dict(zip(coded.pairs, dawid_skene(coded).posterior_b.tolist(), strict=True))

    def winner(pair: PairRecord, _: list[Label]) -> tuple[str | None, dict[str, Any]]:
        if pair.id not in posterior_b:
            return None, {"p_chosen": None}
        p_b = posterior_b[pair.id]
        if abs(p_b - 0.5) <= TIE_TOLERANCE:
            return None, {"p_chosen": 0.5}
        side = "b" if p_b > 0.5 else "a"
        return side, {"p_chosen": p_b if side == "b" else 1.0 - p_b}

    return winner
